"""Multi-turn sampling in a real vLLM engine (in-process, env hosts as plain objects), and a
multi-turn run under real Ray with the env hosts and the sandboxed tool pool."""
import json
import os
import time

import pytest
import torch

from grpo_ray.core.records import TrainBatch
from grpo_ray.envs import EnvSpec
from grpo_ray.roles.env_host import EnvHost
from grpo_ray.roles.multiturn import EnvRollout

pytestmark = pytest.mark.slow
PROMPTS = ["Q: 1+2=?\nA:", "Q: 13+29=?\nA:"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    from grpo_ray.roles.generator import Generator

    return Generator(tiny_model_dir, cpu_threads="0", seed=0)


def _env(spec, **kw):
    return EnvRollout((EnvHost(), EnvHost()), spec, **kw)


def test_three_turn_logprobs_match_the_learner_after_a_weight_sync(gen, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from grpo_ray.models.modeling import batched_logprobs
    from grpo_ray.roles.weight_sync import pack_state_dict

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    gen.update_weights(pack_state_dict(hf.state_dict().items(), 1 << 30), version=1)
    ro = gen.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=48, seed=11, records=[{}, {}],
                      env=_env(EnvSpec("env_fns:Echo", {"turns": 3}), max_turns=3, turn_tokens=6))
    assert ro.weight_version == 1 and [t.turns for t in ro.trajectories] == [3] * 6
    assert all(len(t.observations) == 2 and t.tool_calls == 2 for t in ro.trajectories)
    for r, t in zip(ro.response_ids, ro.trajectories):  # the observations are in the sequence, as tokens
        assert [r[s:e] for s, e in t.observations] == [gen.tokenizer("\n#### 7\n", add_special_tokens=False)["input_ids"]] * 2
    batch = TrainBatch.from_rollout(ro, torch.zeros(len(ro)), pad_id=gen.tokenizer.pad_token_id)
    learner = batched_logprobs(hf, batch, micro_batch_size=4, share_prompts=True)
    mask = batch.response_mask.bool()
    assert int(mask.sum()) > 6 * 3 and not mask.all()
    assert float((learner - batch.old_logprobs)[mask].abs().max()) < 1e-4
    assert float(batch.old_logprobs[~mask].abs().max()) == 0.0
    again = gen.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=48, seed=11, records=[{}, {}],
                         env=_env(EnvSpec("env_fns:Echo", {"turns": 3}), max_turns=3, turn_tokens=6))
    assert again.response_ids == ro.response_ids  # seeded: the same trajectories


def test_a_trajectory_that_fills_the_context_is_truncated_cleanly(gen):
    ro = gen.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=30, seed=1, records=[{}, {}],
                      env=_env(EnvSpec("env_fns:Flood"), max_turns=4, turn_tokens=5))
    for r, lp, t, cut in zip(ro.response_ids, ro.old_logprobs, ro.trajectories, ro.truncated):
        assert cut and len(r) == len(lp) == 30 and t.turns == 1
        assert t.observations == [(5, 30)] and lp[5:] == [0.0] * 25 and t.reward is None and t.error is None
    batch = TrainBatch.from_rollout(ro, torch.zeros(len(ro)), pad_id=0)
    assert batch.response_mask[:, :5].all() and not batch.response_mask[:, 5:].any()


def test_a_failing_environment_ends_its_own_trajectories_only(gen):
    records = [{"env": "env_fns:Broken"}, {}]
    ro = gen.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=40, seed=2, records=records,
                      env=_env(EnvSpec("env_fns:Echo", {"turns": 2, "reward": 1.0}), max_turns=4, turn_tokens=5))
    broken, fine = ro.trajectories[:2], ro.trajectories[2:]
    assert all("Broken.step raised KeyError" in t.error and t.turns == 2 for t in broken)
    assert all(t.error is None and t.reward == 1.0 and t.turns == 2 for t in fine)


def test_trajectories_do_not_wait_for_each_others_tool_calls(gen):
    """Four slow tool calls (0.5 s each) on four threads of one host overlap with each other and
    with the sampling: the wall time is about one call per turn, not one per trajectory."""
    env = EnvRollout((EnvHost(),), EnvSpec("env_fns:Sleepy", {"seconds": 0.5, "turns": 2}), max_turns=4,
                     turn_tokens=4)
    start = time.perf_counter()
    ro = gen.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=40, seed=3, records=[{}, {}], env=env)
    took = time.perf_counter() - start
    assert [t.turns for t in ro.trajectories] == [2] * 8
    assert took < 8 * 2 * 0.5 / 2, took  # serial calls would take 8 s
    assert 0.5 <= ro.env_s <= took


# ---------------------------------------------------------------- under real Ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_user_environment_trains_under_ray_and_logs_its_turns(ray_local, tmp_path, mode):
    from grpo_ray.config import load_config
    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", [f"rollout.asynchronous={mode == 'async'}",
        f"run.output_dir={tmp_path}", "run.name=env", "train.steps=2", "train.eval_every=0", "eval.num_prompts=4",
        "eval.samples=4", "eval.ks=[1]", "rollout.prompts_per_step=4", "algo.group_size=4", "rollout.max_new_tokens=40",
        "env.name=env_fns:Echo", "env.options={turns: 3}", "env.max_turns=3", "env.turn_tokens=12",
        "reward.pool.mode=serve",
        "train.spot_check_every=1", "train.checkpoint_every=0", "learner.num_ranks=1", "rollout.num_generators=1"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["env/turns/mean"] for r in steps] == [3.0, 3.0]
    assert all(r["env/tool_calls/mean"] == 2.0 and r["env/errors/frac"] == 0.0 for r in steps)
    assert all(r["env/observation_tokens/mean"] > 0 and r["time/env"] >= 0 for r in steps)
    assert [r["eval/tool_calls/mean"] for r in rows if "eval/pass@1" in r] == [2.0, 2.0]
    spot = [json.loads(line) for line in open(os.path.join(run_dir, "samples", "step_000001.jsonl"))]
    assert [t["role"] for t in spot[0]["turns"]] == ["model", "env", "model", "env", "model"]
    assert "**[env]**" in open(os.path.join(run_dir, "samples", "step_000001.md")).read()


def test_hostile_tool_calls_through_the_pool_leave_it_and_the_host_alive(ray_local):
    import ray

    from grpo_ray.config import Config
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.roles.verifier_pool import VerifierPool

    pool = VerifierPool(Config().reward, actor_env(), name="tools")
    try:
        host = ray.remote(EnvHost).options(num_cpus=0.1, max_concurrency=8).remote(pool.app, 4)
        spec = EnvSpec("python", {"timeout_s": 2.0, "memory_mb": 256})
        ray.get(host.reset.remote([(k, spec, {}) for k in "abcde"]))
        calls = {"a": "import os\nwhile True:\n    os.fork()", "b": "while True:\n    pass",
                 "c": "x = bytearray(10**10)", "d": "while True:\n    print('x' * 10000)"}
        start = time.monotonic()
        replies = ray.get([host.step.remote(k, f"```python\n{c}\n```\n```output") for k, c in calls.items()])
        assert time.monotonic() - start < 15
        assert all(r.error is None and r.step.tool_errors == 1 for r in replies), replies
        # the fork bomb's own error may be its EAGAIN (BlockingIOError); the others hit a limit
        assert all("error:" in r.step.observation for r in replies[1:]), replies
        ok = ray.get(host.step.remote("e", "```python\nprint(2**10)\n```\n```output"))
        assert ok.step.observation == "\n1024\n```\n" and ok.step.tool_errors == 0
        assert pool.running() >= 1
    finally:
        pool.shutdown()


def test_a_rollout_that_fails_leaves_the_engine_clean_for_the_next_call(gen):
    class DeadHost:
        def reset(self, items):
            raise RuntimeError("the host went away")

        def step(self, key, completion):  # never reached
            raise AssertionError

        def close(self, keys):
            pass

    env = EnvRollout((DeadHost(),), EnvSpec("env_fns:Echo"), max_turns=2, turn_tokens=4)
    with pytest.raises(RuntimeError, match="the host went away"):
        gen.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=20, seed=4, records=[{}, {}], env=env)
    assert not gen.llm.llm_engine.has_unfinished_requests()
    ro = gen.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=8, seed=4)  # single-turn, as before
    assert len(ro) == 4
