"""Issue 28: non-finite guards in the learner. An update whose loss or gradient is not finite skips
that optimizer step: weights, optimizer state (Adam moments, step count) and LR schedule stay as
they were, the step counts in `nonfinite_steps`, and the other mini-batches of the update still
step. The non-finite gradient is injected through the real code path: a NaN or inf advantage on
one row makes the loss and the gradient non-finite.

Fast: the learner over the plain-torch test backend, and the driver's reaction. Slow: a real
DeepSpeed engine (ZeRO-0 fp32, the default, where DeepSpeed itself would step with the NaN;
ZeRO-2, ZeRO-3 and ZeRO-0 bf16, where DeepSpeed's own optimizers skip), each in a fresh process
(one torch.distributed group each)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from grpo_ray.core.algorithm import loss_normalizer
from test_learner_backend import plain_learner  # noqa: F401 - a fixture
from test_learner_options import _batch


def _norm(b):
    return loss_normalizer(b.response_mask, "seq_mean")


def _poisoned(b, row: int, value: float = float("nan")):
    """The batch with one row's advantage set to `value` (a new TrainBatch)."""
    bad = b.select(slice(0, b.size))
    bad.advantages = b.advantages.clone()
    bad.advantages[row] = value
    return bad


def _equal(a, b) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _weights(learner) -> dict:
    with learner.backend.full_parameters() as module:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _copy(x):
    """A snapshot: state dicts hold the live tensors, which the next step changes in place."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_copy(v) for v in x]
    return x


def _state(learner) -> dict:
    """Weights, the optimizer's state (its parameters: the float32 masters or ZeRO partitions
    inside a DeepSpeed wrapper; moments; step counts; lr) and the LR schedule's."""
    opt = learner.backend.optimizer
    inner = getattr(opt, "optimizer", opt)  # the client AdamW
    # keyed by the tensors it steps (ZeRO-3 hands it its partitions only during the step)
    return _copy({"weights": _weights(learner), "params": list(inner.state), "moments": list(inner.state.values()),
                  "groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
                  "scheduler": learner.backend.scheduler.state_dict()})


def _finite(weights: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values())


def check_skips(learner, tmp_dir: str) -> None:
    """The checks shared by every backend: a skipped step changes nothing, a partly bad update
    applies its good mini-batches exactly as if the bad one were absent, and the next finite
    update trains as usual."""
    b = _batch(seed=1, rows=8)
    b.old_logprobs = learner.logprobs(b)
    first = learner.update([b], [_norm(b)])  # Adam moments and a step count exist from here on
    assert _state(learner)["moments"][0], "no optimizer state to compare"
    assert first["nonfinite_steps"] == 0.0 and first["optimizer_steps"] == 1.0 and math.isfinite(first["loss"])

    for value in (float("nan"), float("inf")):
        before = _state(learner)
        stats = learner.update([_poisoned(b, 3, value)], [_norm(b)])
        after = _state(learner)
        assert _finite(after["weights"]), "a non-finite gradient reached the weights"
        assert _equal(before, after), "a skipped step changed the weights, optimizer or LR schedule"
        assert stats["nonfinite_steps"] == 1.0 and stats["optimizer_steps"] == 0.0

    # two mini-batches, the second bad: the first steps, exactly as it does alone
    good, bad = b.select(slice(0, 4)), _poisoned(b, 5).select(slice(4, 8))
    learner.save_state(tmp_dir)
    stats = learner.update([good, bad], [_norm(good), _norm(bad)])
    assert stats["nonfinite_steps"] == 1.0 and stats["optimizer_steps"] == 1.0
    assert all(math.isfinite(stats[k]) for k in ("loss", "pg_loss", "grad_norm", "entropy")), stats
    mixed = _state(learner)
    assert _finite(mixed["weights"]) and not _equal(mixed["weights"], before["weights"])
    learner.load_state(tmp_dir)
    alone = learner.update([good], [_norm(good)])
    assert _equal(mixed, _state(learner)), "the good mini-batch's step differs when a bad one follows it"
    assert stats["loss"] == pytest.approx(alone["loss"], rel=1e-6) and stats["grad_norm"] == alone["grad_norm"]

    after_bad = learner.update([b], [_norm(b)])  # training goes on normally
    assert after_bad["nonfinite_steps"] == 0.0 and after_bad["optimizer_steps"] == 1.0
    final = _weights(learner)
    assert _finite(final) and not _equal(final, mixed["weights"])


def test_skipped_step_leaves_weights_optimizer_and_schedule_unchanged(plain_learner, tmp_path):  # noqa: F811
    check_skips(plain_learner(warmup_steps=3), str(tmp_path))


def test_every_step_skipped_reports_nan_not_zero(plain_learner):  # noqa: F811
    learner = plain_learner()
    b = _batch(seed=2, rows=8)
    b.old_logprobs = learner.logprobs(b)
    halves = [_poisoned(b, 1).select(slice(0, 4)), _poisoned(b, 6).select(slice(4, 8))]
    stats = learner.update(halves, [_norm(h) for h in halves], 2)
    assert stats["nonfinite_steps"] == 4.0 and stats["optimizer_steps"] == 0.0
    assert math.isnan(stats["loss"]) and math.isnan(stats["grad_norm"])
    assert {"entropy", "clip/low", "clip/high", "tokens"} <= stats.keys()  # the summary line's keys stay


class _Metrics(list):
    write = list.append


def _run(tmp_path, limit: int):
    """A driver Run with only what Run.nonfinite reads: config, run directory, metrics, log."""
    from grpo_ray.config import Config
    from grpo_ray.driver.run import Run

    run = Run.__new__(Run)
    run.cfg = Config.model_validate({"train": {"max_nonfinite_steps": limit}})
    run.run_dir, run.metrics, run.lines, run.nonfinite_run = str(tmp_path), _Metrics(), [], None
    run.log = run.lines.append
    return run


def test_driver_logs_each_skip_and_stops_after_max_in_a_row(tmp_path):
    from grpo_ray.driver.run import NonFiniteStop

    for step in (2, 4, 5):  # checkpoints: 2 before the non-finite steps, 4 and 5 during them
        os.makedirs(tmp_path / "checkpoints" / f"step_{step:06d}")
    run = _run(tmp_path, limit=3)
    ok, bad = {"nonfinite_steps": 0.0, "optimizer_steps": 2.0}, {"nonfinite_steps": 1.0, "optimizer_steps": 1.0}
    run.nonfinite(1, ok)
    run.nonfinite(2, bad)
    run.nonfinite(3, ok)  # the run of non-finite steps is broken: the count starts again
    assert [e["step"] for e in run.metrics] == [2] and run.metrics[0]["event"] == "nonfinite"
    assert run.metrics[0]["nonfinite_steps"] == 1 and "1 of 2 optimizer steps skipped" in run.metrics[0]["message"]
    assert "lower learner.lr" in run.lines[0] and "bfloat16" in run.lines[0] and "step 2" in run.lines[0]
    run.nonfinite(4, bad)
    run.nonfinite(5, bad)
    with pytest.raises(NonFiniteStop) as e:
        run.nonfinite(6, bad)
    msg = str(e.value)
    assert "stopped after 3 steps in a row" in msg and "steps 4-6" in msg and "weights were not saved" in msg
    assert "step 2 (" in msg and "step_000002" in msg and "lower learner.lr" in msg  # not 4 or 5: during them
    assert [e["step"] for e in run.metrics] == [2, 4, 5, 6]

    fresh = _run(tmp_path / "empty", limit=1)
    with pytest.raises(NonFiniteStop, match="no checkpoint from before them"):
        fresh.nonfinite(1, {"nonfinite_steps": 4.0, "optimizer_steps": 0.0})


def test_max_nonfinite_steps_config():
    from grpo_ray.config import Config, ConfigError

    assert Config().train.max_nonfinite_steps == 3
    with pytest.raises((ConfigError, ValueError)):
        Config.model_validate({"train": {"max_nonfinite_steps": 0}})


def _deepspeed_main(stage: int, dtype: str, port: int, model_dir: str, tmp_dir: str) -> None:
    from grpo_ray.roles.learner import Learner

    loss = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean")
    learner = Learner(model_dir, lr=1e-2, loss_kwargs=loss, micro_batch_size=3, zero_stage=stage, dtype=dtype,
                      master_port=port, warmup_steps=3)
    check_skips(learner, tmp_dir)
    print("ok")


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype,port", [(0, "float32", 29851), (2, "float32", 29852), (3, "float32", 29854),
                                              (0, "bfloat16", 29853)])
def test_deepspeed_skips_non_finite_steps(tiny_model_dir, tmp_path, stage, dtype, port):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
    out = subprocess.run([sys.executable, __file__, str(stage), dtype, str(port), tiny_model_dir, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage,port", [(0, 29855), (2, 29856)])
def test_two_ranks_skip_together_when_one_rank_is_bad(ray_local, tiny_model_dir, stage, port):
    """Only rank 1's share holds the NaN: both ranks skip (rank 0's gradient is finite), the
    weights stay as they were, and both go on training together."""
    from grpo_ray.roles.actors import ACTOR_ENV
    from grpo_ray.roles.learner import Learner
    from grpo_ray.roles.weight_sync import unpack_bucket

    ray = ray_local
    loss = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean")
    actor = ray.remote(Learner).options(num_cpus=0.25, runtime_env={"env_vars": {**ACTOR_ENV, "DS_ACCELERATOR": "cpu"}})
    ranks = [actor.remote(tiny_model_dir, lr=1e-2, loss_kwargs=loss, micro_batch_size=4, zero_stage=stage, rank=r,
                          world_size=2, master_port=port) for r in range(2)]

    def weights():
        return {n: t.clone() for bk in ray.get(ranks[0].weight_buckets.remote()) for n, t in unpack_bucket(bk)}

    b = _batch(seed=3, rows=8)
    b.old_logprobs = ray.get(ranks[0].logprobs.remote(b))
    bad = _poisoned(b, 6)
    before = weights()
    stats = ray.get([lr.update.remote([x.select(slice(4 * r, 4 * r + 4))], [_norm(b)])
                     for r, (lr, x) in enumerate(zip(ranks, [bad, bad]))])
    assert [s["nonfinite_steps"] for s in stats] == [1.0, 1.0] and math.isfinite(stats[0]["loss"])
    assert _equal(before, weights())
    stats = ray.get([lr.update.remote([b.select(slice(4 * r, 4 * r + 4))], [_norm(b)]) for r, lr in enumerate(ranks)])
    assert [s["optimizer_steps"] for s in stats] == [1.0, 1.0]
    after = weights()
    assert _finite(after) and not _equal(before, after)
    for lr in ranks:
        ray.kill(lr)


if __name__ == "__main__":
    _deepspeed_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
