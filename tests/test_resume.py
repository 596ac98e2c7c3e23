"""Checkpoints and exact resume through the real loop (slow), and bad checkpoints (fast)."""
import json
import os
import shutil

import pytest

from grpo_ray.driver.checkpoint import (CheckpointError, find_resume, kl_stopped, list_checkpoints, load_state, newest_good,
                                 prune, remove_partial_saves)
from grpo_ray.config import load_config

SMALL = ["rollout.prompts_per_step=4", "algo.group_size=4", "train.eval_every=0", "eval.num_prompts=4",
         "eval.samples=10", "learner.lr=1e-3", "learner.micro_batch_size=8", "algo.epsilon=0.2",
         "algo.mini_batches=2"]  # mini-batches: later ones see ratio != 1, so Adam's state matters


def _cfg(tmp_path, model_dir, name, steps, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                            "task": "reward_fns:digit_fraction"}) + "\n" for i in range(24)))
    return load_config("configs/default.yaml", SMALL + [
        f"run.output_dir={tmp_path}", f"run.name={name}", f"model.path={model_dir}", "data.task=jsonl",
        f"data.train_path={data}", "data.eval_fraction=0.2", f"train.steps={steps}", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["model.lora.rank=4", "model.lora.sync=adapter"]], ids=["full", "lora"])
def test_n_steps_then_resume_equals_2n_steps(ray_local, tiny_model_dir, tmp_path, lora):
    """Also for a LoRA run (issue 24), whose generators get the adapter alone: the checkpoint's
    learner state holds the adapter and its optimizer moments, the resumed generators get it pushed."""
    from grpo_ray.driver.train import train

    full = train(_cfg(tmp_path, tiny_model_dir, "full", 4, "train.checkpoint_every=2", *lora))
    half = train(_cfg(tmp_path, tiny_model_dir, "half", 2, *lora))  # "killed" after 2 steps: its final checkpoint
    assert [s for s, _ in list_checkpoints(half)] == [2]
    resumed = train(_cfg(tmp_path, tiny_model_dir, "half", 4, *lora))  # run.resume=auto picks it up
    assert resumed == half
    a, b = _rows(full), _rows(half)
    steps_a = [r for r in a if "reward/mean" in r]
    steps_b = [r for r in b if "reward/mean" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3, 4]  # the metrics file was appended, not rewritten
    assert any(r.get("event") == "resume" for r in b)
    for ra, rb in zip(steps_a, steps_b):  # same prompts, same samples, same updates
        for key in ("reward/mean", "response_length/mean", "kl", "clip/low", "clip/high"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)
    assert load_state(list_checkpoints(full)[-1][1])["sampler"] == load_state(list_checkpoints(half)[-1][1])["sampler"]
    wa, wb = _weights(os.path.join(full, "final_model")), _weights(os.path.join(half, "final_model"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert max(float((wa[k] - _weights(tiny_model_dir)[k]).abs().max()) for k in wa) > 1e-4  # it trained
    assert [s for s, _ in list_checkpoints(full)] == [2, 4]  # keep_checkpoints=2
    # a resumed run whose last session was cut short after its last checkpoint (during the final
    # evaluation, say) finishes the run: the evaluation and final_model/, and no step again
    shutil.rmtree(os.path.join(half, "final_model"))
    train(_cfg(tmp_path, tiny_model_dir, "half", 4, *lora))
    assert os.path.isdir(os.path.join(half, "final_model"))
    rows = _rows(half)
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/pass@1" in r][-2:] == [4, 4]


def _fake_checkpoint(run_dir, step, model_dir, state=None):
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    shutil.copytree(model_dir, os.path.join(path, "policy"))
    os.makedirs(os.path.join(path, "learner"))
    with open(os.path.join(path, "state.json"), "w") as f:
        f.write(json.dumps(state if state is not None else
                           {"version": 1, "step": step, "sampler": {"epoch": 0, "position": 0},
                            "monitor": {"active": [], "recent_kl": []}}))
    return path


def test_resume_modes_and_bad_checkpoints(tiny_model_dir, tmp_path):
    run = str(tmp_path / "run")
    assert find_resume(run, "auto", tiny_model_dir) is None
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in .*run/checkpoints"):
        find_resume(run, "must", tiny_model_dir)
    good = _fake_checkpoint(run, 2, tiny_model_dir)
    os.makedirs(os.path.join(run, "checkpoints", ".step_000004.tmp"))  # a crash mid-save: ignored
    path, state = find_resume(run, "auto", tiny_model_dir)
    assert path == good and state["step"] == 2
    with pytest.raises(CheckpointError, match="already has checkpoints .*last: step 2.*run.resume=auto"):
        find_resume(run, "never", tiny_model_dir)
    bad = _fake_checkpoint(run, 3, tiny_model_dir, state={})
    with pytest.raises(CheckpointError, match=f"checkpoint {bad}/state.json: missing"):
        find_resume(run, "auto", tiny_model_dir)
    with open(os.path.join(bad, "state.json"), "w") as f:
        f.write('{"step": 3, "sampl')  # truncated
    with pytest.raises(CheckpointError, match="state.json is unreadable"):
        find_resume(run, "auto", tiny_model_dir)
    os.remove(os.path.join(bad, "state.json"))
    with pytest.raises(CheckpointError, match="is incomplete: .*state.json is missing"):
        find_resume(run, "auto", tiny_model_dir)
    shutil.rmtree(bad)
    cfg_path = os.path.join(good, "policy", "config.json")
    conf = json.load(open(cfg_path))
    conf["hidden_size"] *= 2
    json.dump(conf, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"different model .*hidden_size 256 != 128"):
        find_resume(run, "auto", tiny_model_dir)


def test_pruning_keeps_the_last_good_checkpoint_and_the_references_checkpoints_name(tiny_model_dir, tmp_path):
    run = str(tmp_path / "run")
    state = {"version": 1, "sampler": {"epoch": 0, "position": 0}, "monitor": {"active": [], "recent_kl": []}}
    refs = os.path.join(run, "reference_policy")
    for step in (1, 2, 3):
        os.makedirs(os.path.join(refs, f"step_{step:06d}"))
    _fake_checkpoint(run, 2, tiny_model_dir, {**state, "step": 2, "reference": os.path.join(refs, "step_000001")})
    _fake_checkpoint(run, 3, tiny_model_dir, {**state, "step": 3, "kl_stopped": True,
                                              "reference": os.path.join(refs, "step_000002")})
    prune(run, keep=1)
    # step 3 was saved by a KL stop: step 2, the last saved while the rule held, is kept too
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert kl_stopped(list_checkpoints(run)[1][1]) and newest_good(run)[0] == 2
    # references: 1 and 2 are named by the checkpoints, 3 is the newest (the actor's); none goes
    assert sorted(os.listdir(refs)) == ["step_000001", "step_000002", "step_000003"]
    _fake_checkpoint(run, 4, tiny_model_dir, {**state, "step": 4, "reference": os.path.join(refs, "step_000003")})
    prune(run, keep=1)
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert os.listdir(refs) == ["step_000003"]
    os.makedirs(os.path.join(run, "checkpoints", ".step_000005.tmp"))  # a save that crashed
    os.makedirs(os.path.join(refs, ".step_000005.tmp"))
    remove_partial_saves(run)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_000004"] and os.listdir(refs) == ["step_000003"]


def test_cli_resume_without_checkpoint_exits_2(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "{i}+1?", "answer": "{i + 1}"}}\n' for i in range(4)))
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "train", "--resume", f"model.path={tiny_model_dir}",
                           "data.task=jsonl", f"data.train_path={data}", f"run.output_dir={tmp_path}", "run.name=r"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--resume: no checkpoint in {tmp_path}/r/checkpoints" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_resume_with_other_settings_keeps_the_earlier_config(tmp_path):
    from grpo_ray.driver.outputs import create_run_dir

    run = create_run_dir(load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "learner.lr=1e-4"]))
    create_run_dir(load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "learner.lr=5e-5"]))
    kept = [n for n in os.listdir(run) if n.startswith("config.until-")]
    assert len(kept) == 1 and "lr: 0.0001" in open(os.path.join(run, kept[0])).read()
    assert "lr: 5.0e-05" in open(os.path.join(run, "config.yaml")).read()


@pytest.mark.slow
def test_kl_rollback_goes_back_to_the_checkpoint_with_a_lower_lr(ray_local, tiny_model_dir, tmp_path):
    """With a KL limit no update can meet, every step after the first trips the guard: the run
    rolls back to step 1's checkpoint twice (lr x0.5, then x0.25) and then stops."""
    from grpo_ray.driver.train import train

    run_dir = train(_cfg(tmp_path, tiny_model_dir, "rollback", 4, "algo.kl_stop=1e-6", "algo.kl_window=1",
                         "algo.kl_action=rollback", "algo.kl_max_rollbacks=2", "train.checkpoint_every=1",
                         "learner.warmup_steps=0", "algo.mini_batches=1"))
    rows = _rows(run_dir)
    rollbacks = [r for r in rows if r.get("event") == "kl_rollback"]
    assert [r["to_step"] for r in rollbacks] == [1, 1]
    assert "learning rate now 0.0005 (x0.5)" in rollbacks[0]["message"]
    assert "learning rate now 0.00025 (x0.25)" in rollbacks[1]["message"]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 2, 2]  # step 2 ran three times, then the run stopped
    assert [r["weight_version"] for r in steps] == [0, 1, 1, 1]  # each retry sampled from step 1's weights
    assert steps[0]["kl"] < 1e-6 and all(r["kl"] > 1e-6 for r in steps[1:])
    assert os.path.isdir(os.path.join(run_dir, "final_model"))
    # the stop saved the drifted policy as step 2, flagged, and kept step 1 for a later rollback
    assert [s for s, _ in list_checkpoints(run_dir)] == [1, 2]
    assert kl_stopped(list_checkpoints(run_dir)[1][1]) and newest_good(run_dir)[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True])
def test_reference_reset_makes_kl_zero_at_the_next_step(ray_local, tiny_model_dir, tmp_path, asynchronous):
    """algo.ref_reset_every=2: after step 2 the reference is the policy, so step 3's KL (measured
    before its update) is zero, while step 2 saw drift; the reset policy (not the final one) is
    what a resume would load as the reference. Async mode queues step 3's reference pass during
    step 2, which must not happen on the reference that step 2 replaces."""
    from grpo_ray.driver.train import train

    run_dir = train(_cfg(tmp_path, tiny_model_dir, f"refreset-{asynchronous}", 3, "algo.ref_reset_every=2",
                         "algo.mini_batches=1", f"rollout.asynchronous={asynchronous}"))
    steps = {r["step"]: r for r in _rows(run_dir) if "reward/mean" in r}
    assert steps[2]["kl"] > 1e-6
    assert steps[3]["kl"] < 1e-7
    state = load_state(list_checkpoints(run_dir)[-1][1])
    assert state["reference"] == os.path.join(run_dir, "reference_policy", "step_000002")
    ref, final = _weights(state["reference"]), _weights(os.path.join(run_dir, "final_model"))
    assert max(float((ref[k] - final[k]).abs().max()) for k in ref) > 1e-5  # step 3 moved on from it


@pytest.mark.slow
def test_each_checkpoint_names_the_reference_it_had(ray_local, tiny_model_dir, tmp_path):
    """Resets after steps 1, 2 and 3, checkpoints at 2 and 3: a resume from step 2 must load step
    2's reset policy as its reference, not a later reset that overwrote a shared folder."""
    from grpo_ray.driver.train import train

    run_dir = train(_cfg(tmp_path, tiny_model_dir, "refnames", 3, "algo.ref_reset_every=1",
                         "train.checkpoint_every=2", "algo.mini_batches=1"))
    (_, two), (_, three) = list_checkpoints(run_dir)
    for ckpt, step in ((two, 2), (three, 3)):
        ref = load_state(ckpt)["reference"]
        assert ref == os.path.join(run_dir, "reference_policy", f"step_{step:06d}")
        a, b = _weights(ref), _weights(os.path.join(ckpt, "policy"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, step
    # step 1's reset is named by no checkpoint and is not the actor's: pruned
    assert sorted(os.listdir(os.path.join(run_dir, "reference_policy"))) == ["step_000002", "step_000003"]


def test_a_refused_resume_leaves_config_yaml_as_it_was(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 28 #11: a checkpoint of another model in the run dir is refused before config.yaml
    is rewritten with the rejected settings (byte for byte, and no config.until-* copy)."""
    from grpo_ray.driver import train as train_mod
    from grpo_ray.driver.outputs import create_run_dir

    def no_ray(*a, **k):
        raise AssertionError("Ray started: the resume was not refused")

    monkeypatch.setattr(train_mod, "init_ray", no_ray)
    run = create_run_dir(_cfg(tmp_path, tiny_model_dir, "r", 4, "learner.lr=1e-4"))
    before = open(os.path.join(run, "config.yaml"), "rb").read()
    other = _fake_checkpoint(run, 2, tiny_model_dir)  # "model A": twice as wide as the tiny model
    conf = json.load(open(os.path.join(other, "policy", "config.json")))
    conf["hidden_size"] *= 2
    json.dump(conf, open(os.path.join(other, "policy", "config.json"), "w"))
    with pytest.raises(CheckpointError, match="different model"):
        train_mod.train(_cfg(tmp_path, tiny_model_dir, "r", 8, "learner.lr=5e-5"))
    assert open(os.path.join(run, "config.yaml"), "rb").read() == before
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml"]


@pytest.mark.slow
def test_keep_best_keeps_the_best_checkpoint_under_pruning_and_across_a_resume(ray_local, tiny_model_dir, tmp_path):
    """train.keep_best: the best evaluation's checkpoint survives keep_checkpoints=1, also when
    the run is resumed half way, and best_model/ is its policy."""
    from grpo_ray.driver.train import train

    extra = ["train.eval_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=1",
             "train.keep_best=eval/mean_reward"]
    train(_cfg(tmp_path, tiny_model_dir, "best", 2, *extra))  # "killed" after step 2 (its final checkpoint)
    run_dir = train(_cfg(tmp_path, tiny_model_dir, "best", 5, *extra))
    evals = [(r["step"], r["eval/mean_reward"]) for r in _rows(run_dir) if "eval/mean_reward" in r and r["step"] >= 1]
    assert [s for s, _ in evals] == [1, 2, 3, 4, 5]  # both sessions' evaluations
    best_step = max(evals, key=lambda e: e[1])[0]  # the first of the highest (a later tie is not better)
    assert [s for s, _ in list_checkpoints(run_dir)] == sorted({best_step, 5})  # pruned to the newest + the best
    state = load_state(list_checkpoints(run_dir)[-1][1])
    assert state["best"] == {"metric": "eval/mean_reward", "value": max(v for _, v in evals), "step": best_step}
    wa = _weights(os.path.join(run_dir, "best_model"))
    wb = _weights(os.path.join(run_dir, "checkpoints", f"step_{best_step:06d}", "policy"))
    assert all(float((wa[k] - wb[k]).abs().max()) == 0.0 for k in wa)


def test_keep_best_must_name_a_logged_metric():
    from grpo_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.keep_best='eval/pass@5': no evaluation logs it; the metrics are "
                                          r"eval/pass@1, eval/pass@10, eval/mean_reward"):
        load_config("configs/default.yaml", ["train.keep_best=eval/pass@5"])
    assert load_config("configs/default.yaml", ["train.keep_best=eval/pass@10"]).train.keep_best == "eval/pass@10"
