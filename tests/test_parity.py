"""The weight-sync parity guard (issue 28): a generator whose samples disagree with the learner
beyond algo.sampler_kl_max gets the weights pushed again, and if it still disagrees at the next
step the run stops naming it. Quick: the attribution of rows to generators and the decision;
slow: a real run with a generator loaded with wrong weights."""
import json
import os

import pytest
import torch

from grpo_ray.config import load_config
from grpo_ray.core.metrics import combine_parts, mismatch_by_generator, row_mismatch
from grpo_ray.core.records import Rollout
from grpo_ray.driver.parity import AUTO_MAX, describe, threshold, verdict


def _part(n: int, start: int = 0) -> Rollout:
    return Rollout([[1]] * n, [[2, 3]] * n, [[-0.5, -0.5]] * n, [f"t{start + i}" for i in range(n)], [False] * n)


def test_rows_keep_their_generator_through_concat_and_group_selection():
    rollout = Rollout.concat([_part(4), _part(2, 4), _part(2, 6)])
    assert rollout.generators == [0, 0, 0, 0, 1, 1, 2, 2]
    # dynamic sampling keeps some groups of each round and joins them: the rows keep their generator
    kept = Rollout.concat([rollout.select_groups([2], 2), rollout.select_groups([0, 3], 2)])
    assert kept.texts == ["t4", "t5", "t0", "t1", "t6", "t7"]
    assert kept.generators == [1, 1, 0, 0, 2, 2]


def test_row_mismatch_and_token_weighted_means_per_generator():
    diff = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    rows = row_mismatch(torch.tensor([5, 3, 4]), diff, mask, shard=1)  # padding (9.0) does not count
    assert [(j, r, round(s, 6), n) for j, r, s, n in rows] == [(1, 5, 0.4, 2.0), (1, 3, 0.2, 1.0), (1, 4, 3.0, 3.0)]
    # batch rows -> generators: 0 and 1 are generator 0's, 2 and 3 generator 1's; row 4 unmeasured
    by = mismatch_by_generator([(0, 0.4, 2.0), (1, 0.2, 1.0), (3, 3.0, 3.0), (2, 0.0, 0.0)], [0, 0, 1, 1, 2])
    assert by[0] == pytest.approx((0.6 / 3, 3.0)) and by[1] == pytest.approx((1.0, 3.0))
    assert 2 not in by  # no measured token: not judged
    assert mismatch_by_generator([(0, 1.0, 1.0)], []) == {}  # generators unknown
    # the learner's per-row lists join across ranks (combine_parts) instead of breaking the means
    out = combine_parts([{"x": 1.0, "tokens": 1.0, "rows": [(0, 0, 0.1, 1.0)]},
                         {"x": 3.0, "tokens": 3.0, "rows": [(0, 1, 0.2, 3.0)]}])
    assert out["x"] == 2.5 and out["rows"] == [(0, 0, 0.1, 1.0), (0, 1, 0.2, 3.0)]


def test_the_learner_groups_shares_map_back_to_batch_rows():
    from grpo_ray.roles.learner_group import LearnerGroup, Update

    class Ref:  # stands in for a rank's stats
        def __init__(self, value):
            self.value = value

    group = LearnerGroup.__new__(LearnerGroup)
    group.wait = lambda refs, call: [r.value for r in refs]
    # 2 mini-batches x 2 ranks over 8 rows: rank 0 holds rows 0-1 and 4-5, rank 1 rows 2-3 and 6-7
    update = Update([Ref({"tokens": 1.0, "sampler_kl/rows": [(0, 1, 0.5, 2.0), (1, 0, 0.25, 1.0)]}),
                     Ref({"tokens": 1.0, "sampler_kl/rows": [(1, 1, 1.0, 4.0)]})], None, [[0, 4], [2, 6]])
    stats, rows = group.results(update)
    assert rows == [(1, 0.5, 2.0), (4, 0.25, 1.0), (7, 1.0, 4.0)] and "sampler_kl/rows" not in stats


def test_verdict_pushes_again_then_stops():
    by = {0: (1e-8, 40.0), 1: (0.4, 38.0)}
    assert verdict(by, 1e-3, pushed_again=False) == ({1: 0.4}, False)  # first time: push again
    assert verdict(by, 1e-3, pushed_again=True) == ({1: 0.4}, True)  # still there after the push: stop
    assert verdict({0: (1e-8, 40.0)}, 1e-3, pushed_again=True) == ({}, False)  # the push fixed it
    assert verdict(by, None, pushed_again=True) == ({}, False)  # no guard
    assert describe({1: 0.4, 0: 0.01}, ["generator 0 (x)", "generator 1 (node n, pid 7)"], by) == (
        "generator 1 (node n, pid 7): sampler_kl 0.4 over 38 tokens, generator 0 (x): sampler_kl 0.01 over 40 tokens")


def test_threshold_by_dtype_unless_set_and_off_when_asynchronous():
    assert threshold(load_config("configs/default.yaml", [])) == AUTO_MAX["float32"] == 1e-3
    assert threshold(load_config("configs/default.yaml", ["model.dtype=bfloat16"])) == 1e-2
    assert threshold(load_config("configs/default.yaml", ["rollout.asynchronous=true"])) is None
    assert threshold(load_config("configs/default.yaml", ["rollout.asynchronous=true",
                                                          "algo.sampler_kl_max=0.2"])) == 0.2


# ---------------------------------------------------------------- a real run (slow)
def _wrong_weights_for_generator_1(monkeypatch, corrupt) -> list:
    """Wrap GeneratorFleet.push so that a push whose version `corrupt` accepts sends generator 1
    the learner's weights with every floating tensor times 1.5, under the same version (the
    fleet believes it is current: no stale-version retry catches it). Returns the versions
    pushed, in order (resyncs included)."""
    import ray

    from grpo_ray.roles.fleet import GeneratorFleet, Push
    from grpo_ray.roles.weight_sync import pack_state_dict, unpack_bucket

    pushed = []

    def push(self, weights, version, broadcast=False):
        assert not broadcast  # sync.method=object_store: the buckets themselves
        pushed.append(version)
        bad = None
        if corrupt(version):
            named = [(n, t * 1.5 if t.is_floating_point() else t.clone()) for b in ray.get(weights)
                     for n, t in unpack_bucket(b)]
            bad = pack_state_dict(named)
        self._loading.append(Push(version, weights, loads=[
            g.update_weights.remote(bad if i == 1 and bad is not None else weights, version)
            for i, g in enumerate(self.actors)]))
        self.version = version

    monkeypatch.setattr(GeneratorFleet, "push", push)
    return pushed


def _run_cfg(tmp_path, model_dir, name: str, steps: int):
    from test_fault_tolerance import _overrides as small_run

    return load_config("configs/default.yaml", small_run(tmp_path, model_dir, name, steps) + ["run.plots=false"])


def _records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_a_generator_given_wrong_weights_once_gets_them_pushed_again(ray_local, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capfd):
    from grpo_ray.driver.train import train

    pushed = _wrong_weights_for_generator_1(monkeypatch, lambda version: version == 1)
    run_dir = train(_run_cfg(tmp_path, tiny_model_dir, "once", 4))
    records = _records(run_dir)
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    events = [r for r in records if r.get("event") in ("parity", "parity_stop")]
    assert [(e["step"], e["event"]) for e in events] == [(2, "parity")], events
    (name, kl), = events[0]["generators"].items()
    assert name.startswith("generator 1 (") and kl > 1e-2, events[0]
    assert pushed == [1, 2, 2, 3, 4]  # step 2's push, then the guard's push of the same weights
    assert steps[1]["sampler_kl"] > 1e-3  # step 2 sampled half its rows with the wrong weights
    assert all(abs(r["sampler_kl"]) < 1e-4 for r in steps[2:])  # back in sync
    said = "".join(capfd.readouterr())  # the run's log (tqdm.write)
    assert "warning: weight-sync parity: at step 2 generator 1 (" in said and "pushing the learner's weights" in said


@pytest.mark.slow
def test_a_generator_that_keeps_wrong_weights_stops_the_run_naming_it(ray_local, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    from grpo_ray.driver.parity import ParityStop
    from grpo_ray.driver.train import train

    pushed = _wrong_weights_for_generator_1(monkeypatch, lambda version: version >= 1)
    with pytest.raises(ParityStop) as stop:
        train(_run_cfg(tmp_path, tiny_model_dir, "always", 5))
    msg = str(stop.value)
    assert msg.startswith("weight-sync parity: at step 3 generator 1 (node "), msg
    assert "pid " in msg and "> algo.sampler_kl_max 0.001, again after the weights were pushed again at step 2" in msg
    assert "check the weight sync (model.dtype" in msg
    records = _records(str(tmp_path / "always"))
    assert [(r["step"], r["event"]) for r in records if r.get("event") in ("parity", "parity_stop")] == [
        (2, "parity"), (3, "parity_stop")]
    assert pushed == [1, 2, 2, 3]  # the guard pushed once, then stopped
