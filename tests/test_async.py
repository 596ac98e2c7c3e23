"""Issue 6: rollout.asynchronous, one step off-policy (slow: the real loop). The rollout of step
n+1 samples while step n trains, so it comes from the weights one update behind; old_logprobs
stay the sampler's, and the ratio carries the lag."""
import json
import os

import pytest

from grpo_ray.config import load_config
from test_train_loop import _dataset

pytestmark = pytest.mark.slow


def _cfg(tmp_path, name, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        _dataset(data, n=40)
    return load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.eval_every=0", "eval.num_prompts=4",
        "eval.samples=10", "learner.lr=1e-2", "learner.warmup_steps=0", "learner.micro_batch_size=16",
        "train.spot_check_every=1", "train.spot_check_samples=8", f"run.output_dir={tmp_path}", f"run.name={name}",
        "data.task=jsonl", f"data.train_path={data}", "data.eval_fraction=0.1", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


def _prompts(run_dir, step):
    path = os.path.join(run_dir, "samples", f"step_{step:06d}.jsonl")
    return [json.loads(line)["prompt"] for line in open(path)]


def test_async_rollouts_are_one_update_behind_and_resume_on_the_same_prompts(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.driver.train import train

    model = f"model.path={tiny_model_dir}"
    sync_dir = train(_cfg(tmp_path, "sync", model, "train.steps=3"))
    full = train(_cfg(tmp_path, "async", model, "train.steps=4", "rollout.asynchronous=true"))
    rows = _rows(full)
    # step 1 samples with the initial weights; step n+1 starts sampling while step n trains
    assert [r["weight_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["weight_version"] for r in _rows(sync_dir)] == [0, 1, 2]
    # on-policy at step 1; afterwards the learner has moved one update past the sampler, and
    # the ratio against the sampler's logprobs shows it (in sync mode it is 1 before the step)
    assert abs(rows[0]["sampler_kl"]) < 1e-4 and abs(rows[0]["ratio/mean"] - 1) < 1e-4
    assert all(abs(r["sampler_kl"]) > 1e-3 for r in rows[1:])
    assert all(abs(r["sampler_kl"]) < 1e-4 for r in _rows(sync_dir))
    # the same prompts in the same order as sync mode: only the weights that sample them differ
    assert all(_prompts(full, s) == _prompts(sync_dir, s) for s in (1, 2, 3))
    # a checkpoint at step 2 does not save the rollout sampling ahead: the resumed run draws
    # step 3's prompts again instead of skipping them
    part = train(_cfg(tmp_path, "resumed", model, "train.steps=2", "train.checkpoint_every=2",
                      "rollout.asynchronous=true"))
    train(_cfg(tmp_path, "resumed", model, "train.steps=4", "train.checkpoint_every=2", "rollout.asynchronous=true"))
    assert [r["step"] for r in _rows(part)] == [1, 2, 3, 4]
    assert _prompts(part, 3) == _prompts(full, 3) and _prompts(part, 4) == _prompts(full, 4)

