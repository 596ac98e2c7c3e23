"""Actors killed mid-run (slow): a generator and the reference crash (SIGKILL) during training;
Ray restarts them, the generator gets the current weights again, and every step completes with
all its samples, none from stale weights."""
import json
import os

import psutil
import pytest

from grpo_ray.config import load_config

pytestmark = pytest.mark.slow


def _kill(title: str) -> int:
    """SIGKILL the Ray worker whose process title is `title` (e.g. ray::Generator) and wait
    until it is gone."""
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith(title):
            p.kill()
            p.wait(timeout=30)
            return p.pid
    raise AssertionError(f"no process {title}")


def _kill_at(monkeypatch, phase: str, kills: dict[int, str], killed: list, module: str = "grpo_ray.driver.rollout") -> list:
    """Wrap the driver's `phase` (a function of `module`, or Class.method) so that its n-th call
    first kills the actor kills[n]: the crash lands at a chosen point of a chosen step, however
    fast the box runs (a thread watching metrics.jsonl could land a step late, or after the
    run). Returns the call counter."""
    import importlib

    owner = importlib.import_module(module)
    *path, name = phase.split(".")
    for attr in path:
        owner = getattr(owner, attr)
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] in kills:
            killed.append((kills[calls[0]], _kill(kills[calls[0]])))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def _overrides(tmp_path, model_dir, name: str, steps: int) -> list[str]:
    """A small run on a dense user reward (every step has a signal)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    return [f"run.output_dir={tmp_path}", f"run.name={name}", f"model.path={model_dir}", "data.task=jsonl",
            f"data.train_path={data}", "data.eval_fraction=0.25", "rollout.prompts_per_step=4", "algo.group_size=4",
            f"train.steps={steps}", "train.eval_every=0", "eval.num_prompts=3", "eval.samples=10", "learner.lr=1e-3",
            "eval.sets=[]"]  # one set: an evaluation is one fleet.sample call (the kill counters rely on it)


def test_generator_and_reference_killed_mid_run(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    from grpo_ray.driver.train import train

    # the reference in an actor of its own (on CPUs it runs in the learner ranks by default)
    cfg = load_config("configs/default.yaml", _overrides(tmp_path, tiny_model_dir, "ft", 6)
                      + ["resources.reference_host=actor"])
    metrics = tmp_path / "ft" / "metrics.jsonl"
    killed = []
    # step 3's rollout goes to a dead generator; step 5's queued reference pass to a dead reference
    _kill_at(monkeypatch, "sample_and_score", {3: "ray::Generator", 5: "ray::Reference"}, killed)
    # and the final evaluation's sampling (call 2; call 1 is step 0's) goes to a dead generator:
    # it comes back with the base weights, so the fleet pushes step 6's and samples again
    _kill_at(monkeypatch, "GeneratorFleet.sample", {2: "ray::Generator"}, killed, module="grpo_ray.roles.fleet")
    resyncs = _kill_at(monkeypatch, "GeneratorFleet.resync", {}, killed, module="grpo_ray.roles.fleet")
    run_dir = train(cfg)
    assert [t for t, _ in killed] == ["ray::Generator", "ray::Reference", "ray::Generator"]
    # step 3's rollout and the final evaluation's first samples mixed policies: each pushed the
    # current weights once and sampled again
    assert resyncs[0] == 2
    steps = [json.loads(line) for line in open(metrics) if '"reward/mean"' in line]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # every rollout came from the latest weights, also right after the generator's restart
    assert [r["weight_version"] for r in steps] == [0, 1, 2, 3, 4, 5]
    assert all(r["tokens"] > 0 for r in steps)  # 16 completions per step reached the learner
    assert os.path.isdir(os.path.join(run_dir, "final_model"))


def test_learner_killed_ends_the_run_with_a_resume_hint_and_resume_finishes(ray_local, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    from grpo_ray.driver.train import train

    overrides = _overrides(tmp_path, tiny_model_dir, "lk", 5) + ["train.checkpoint_every=2"]
    metrics = tmp_path / "lk" / "metrics.jsonl"
    killed = []
    # step 4's update finds it dead
    _kill_at(monkeypatch, "LearnerGroup.update", {4: "ray::Learner"}, killed, module="grpo_ray.roles.learner_group")
    with pytest.raises(RuntimeError, match=r"an actor died at step 4 .*the last checkpoint is step 2 .*--resume"):
        train(load_config("configs/default.yaml", overrides))
    assert [t for t, _ in killed] == ["ray::Learner"]
    monkeypatch.undo()
    run_dir = train(load_config("configs/default.yaml", overrides + ["run.resume=must"]))
    steps = [json.loads(line)["step"] for line in open(metrics) if '"reward/mean"' in line]
    assert steps[-3:] == [3, 4, 5] and steps[:2] == [1, 2]  # resumed after step 2's checkpoint
    assert os.path.isdir(os.path.join(run_dir, "final_model"))
