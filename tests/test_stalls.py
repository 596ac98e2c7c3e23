"""Frozen actors (SIGSTOP) mid-run (slow): every wait is bounded (run.stall_timeout_s). A frozen
generator is named, restarted, and the step completes with samples from the current weights; a
frozen learner is named and the run stops with the last checkpoint named for --resume. Before,
the driver waited without a word for as long as the actor stayed frozen."""
import json
import os
import re
import signal
import time

import pytest

from grpo_ray.config import load_config
from test_fault_tolerance import _overrides as small_run

pytestmark = pytest.mark.slow

STALL_S = 15


def _overrides(tmp_path, model_dir, name: str, steps: int) -> list[str]:
    """test_fault_tolerance's small run on a dense reward, with a short stall bound."""
    return small_run(tmp_path, model_dir, name, steps) + [f"run.stall_timeout_s={STALL_S}", "run.plots=false"]


def _pid(name: str) -> int:
    """The pid in a role's name, e.g. 'generator 1 (node 10.0.0.2, pid 4242)'."""
    return int(re.search(r"pid (\d+)", name).group(1))


def _freeze_at(monkeypatch, owner, method: str, call: int, pick, frozen: list) -> None:
    """Wrap owner.method so that its call-th call first SIGSTOPs the process pick(args) names."""
    original, calls = getattr(owner, method), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            pid = pick(args)
            os.kill(pid, signal.SIGSTOP)
            frozen.append((pid, time.monotonic()))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, wrapped)


def _thaw(frozen: list) -> None:
    for pid, _ in frozen:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_frozen_generator_is_named_restarted_and_the_step_completes(ray_local, tiny_model_dir, tmp_path,
                                                                      monkeypatch, capfd):
    import grpo_ray.driver.rollout as rollout
    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", _overrides(tmp_path, tiny_model_dir, "gs", 4))
    frozen = []
    # step 2's rollout goes to a frozen generator 1
    _freeze_at(monkeypatch, rollout, "sample_and_score", 2, lambda args: _pid(args[0].fleet.names[1]), frozen)
    try:
        run_dir = train(cfg)
    finally:
        _thaw(frozen)
    err = capfd.readouterr().err
    pid = frozen[0][0]
    assert re.search(rf"generator 1 \(node [\d.]+, pid {pid}\) stalled: generate made no progress for "
                     rf"{STALL_S} s \(run.stall_timeout_s\); restarting it", err), err[-3000:]
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # every rollout came from the latest weights, also the one resampled after the restart
    assert [r["weight_version"] for r in steps] == [0, 1, 2, 3]
    with pytest.raises(ProcessLookupError):  # the frozen process was replaced, not left behind
        os.kill(pid, 0)


def test_a_frozen_learner_stops_the_run_naming_it_and_the_checkpoint(ray_local, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    import grpo_ray.roles.learner_group as learner_group
    from grpo_ray.driver.train import train

    overrides = _overrides(tmp_path, tiny_model_dir, "ls", 4) + ["train.checkpoint_every=2"]
    frozen = []
    # step 3's update finds learner rank 0 frozen
    _freeze_at(monkeypatch, learner_group.LearnerGroup, "update", 3, lambda args: _pid(args[0].names[0]), frozen)
    try:
        with pytest.raises(RuntimeError) as caught:
            train(load_config("configs/default.yaml", overrides))
    finally:
        _thaw(frozen)
    message, took = str(caught.value), time.monotonic() - frozen[0][1]
    assert re.search(r"at step 3, learner rank 0 \(node [\d.]+, pid \d+\)[^;]* stalled: update made no progress "
                     rf"for {STALL_S} s .*stopping; the last checkpoint is step 2 .*--resume", message), message
    assert took < STALL_S + 60, f"the stall was reported {took:.0f} s after the freeze"
