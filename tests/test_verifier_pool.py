"""The verifier pool (grpo_ray/roles/verifier_pool.py): the replica class without Ray, then the real
Ray Serve deployment: autoscaling under a burst of code checks, a replica killed mid-burst, and
a request that times out."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from grpo_ray.config import load_config
from grpo_ray.roles.verifier_pool import VerifierReplica, deployment_options

# each check sleeps in the trusted test code, so a burst keeps replicas busy on 2 cores
SLOW = {"task": "code", "entry_point": "f", "tests": "import time\ntime.sleep(0.3)\nassert f() == 1\n"}
RIGHT, WRONG = "def f():\n    return 1\n", "def f():\n    return 2\n"


def test_replica_scores_in_order_without_ray():
    rep = VerifierReplica({"correct": 1.0, "format": 0.5}, {"math": {"extraction": "marked"}}, threads=2)
    recs = [{"answer": "4"}] * 3
    out, busy = asyncio.run(rep.score(recs, ["#### 4", "the answer is 4", "<think>x</think><answer>#### 4</answer>"]))
    assert busy > 0
    assert [s.reward for s in out] == [1.0, 0.0, 1.5]  # "marked" extraction: a bare trailing 4 is not an answer
    assert out[1].reason == "no answer found in \\boxed{} or after ####"


def test_deployment_options_come_from_config():
    cfg = load_config(None, ["reward.pool.min_replicas=2", "reward.pool.max_replicas=5",
                             "reward.pool.target_ongoing_requests=3", "reward.pool.replica_cpus=0.5"])
    opts = deployment_options(cfg.reward.pool, {"A": "1"}, has_verifier_resource=False)
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (2, 5, 3.0)
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "runtime_env": {"env_vars": {"A": "1"}}}
    with_res = deployment_options(cfg.reward.pool, {}, has_verifier_resource=True)
    assert with_res["ray_actor_options"]["resources"] == {"verifier": 1.0}


def test_replicas_ask_for_verifier_nodes_when_the_cluster_has_them_or_the_config_says_so():
    from grpo_ray.roles.verifier_pool import needs_verifier_nodes

    assert needs_verifier_nodes("auto", {"CPU": 2.0, "verifier": 8.0})
    assert not needs_verifier_nodes("auto", {"CPU": 2.0})  # e.g. an autoscaler's verifier group at 0 nodes
    assert needs_verifier_nodes("require", {"CPU": 2.0})  # the pending demand makes it add the first
    assert not needs_verifier_nodes("none", {"CPU": 2.0, "verifier": 8.0})
    assert load_config("configs/code_humaneval_8gpu.yaml").reward.pool.verifier_nodes == "require"


def test_auto_chunks_hold_about_target_request_s_of_work():
    from grpo_ray.roles.verifier_pool import VerifierPool

    pool = VerifierPool.__new__(VerifierPool)  # the sizing rule only; no Serve
    pool.cfg = load_config(None, []).reward.pool  # chunk_size 0 (auto), target_request_s 0.25
    pool.check_s = None
    assert pool.chunk_size(512) == 8  # cost unknown: small chunks
    pool.check_s = 0.05  # code checks
    assert pool.chunk_size(512) == 5
    pool.check_s = 2e-5  # math checks: the whole step in one request
    assert pool.chunk_size(512) == 512
    pool.check_s = 10.0  # slower than the target: one check per request
    assert pool.chunk_size(512) == 1
    pool.cfg = load_config(None, ["reward.pool.chunk_size=16"]).reward.pool
    assert pool.chunk_size(512) == 16


def test_pool_bounds_are_checked():
    from grpo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="reward.pool.max_replicas=1 is below reward.pool.min_replicas=2"):
        load_config(None, ["reward.pool.min_replicas=2", "reward.pool.max_replicas=1"])


def _pool(tmp_path, *overrides):
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.roles.verifier_pool import VerifierPool

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "reward.pool.chunk_size=1", *overrides])
    return VerifierPool(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)


def _burst(pool, n):
    """Score n slow code checks on a thread; alternate right and wrong programs."""
    out = {}
    responses = [RIGHT if i % 2 == 0 else WRONG for i in range(n)]
    thread = threading.Thread(target=lambda: out.setdefault("scores", pool.score([SLOW] * n, responses)))
    thread.start()
    return thread, out, [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


@pytest.mark.slow
def test_pool_scales_up_under_a_burst_and_back_down_when_idle(ray_local, tmp_path):
    pool = _pool(tmp_path, "reward.pool.min_replicas=1", "reward.pool.max_replicas=3",
                 "reward.pool.target_ongoing_requests=1", "reward.pool.max_ongoing_requests=2",
                 "reward.pool.upscale_delay_s=0.5", "reward.pool.downscale_delay_s=2")
    try:
        assert pool.running() == 1
        thread, out, expected = _burst(pool, 60)
        peak = 1
        while thread.is_alive():
            # the scaling decision is what is tested: a replica still booting when the burst ends
            # (a slow CI box) counts
            states = pool.replicas()
            peak = max(peak, states.get("RUNNING", 0) + states.get("STARTING", 0))
            time.sleep(0.25)
        thread.join()
        assert [s.reward for s in out["scores"]] == expected
        assert peak > 1, "the pool never scaled above min_replicas under the burst"
        deadline = time.monotonic() + 60
        while pool.replicas() != {"RUNNING": 1} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool.replicas() == {"RUNNING": 1}, "the pool did not scale back to min_replicas when idle"
    finally:
        pool.shutdown()


def _replica_actors(app: str) -> list:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def _busy_replica(app: str, deadline_s: float):
    """The handle of a replica of app with requests in flight (Serve's own queue-length probe)."""
    import ray

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for a in _replica_actors(app):
            handle = ray.get_actor(a["name"], namespace=a["namespace"])
            if ray.get(handle.get_num_ongoing_requests.remote(), timeout=10) > 0:
                return handle
        time.sleep(0.05)
    raise AssertionError(f"no replica of {app} had a request in flight within {deadline_s} s")


@pytest.mark.slow
def test_replica_killed_mid_burst_loses_no_score(ray_local, tmp_path):
    import ray

    pool = _pool(tmp_path, "reward.pool.min_replicas=2", "reward.pool.max_replicas=2")
    try:
        assert len(_replica_actors(pool.app)) == 2
        # both replicas answer before the burst (chunk_size=1: no cost probe, every check its own request)
        assert [s.reward for s in pool.score([SLOW] * 2, [RIGHT, WRONG])] == [1.0, 0.0]
        # kill a replica seen working on checks: a fixed sleep once found the victim idle, or not
        # yet sent anything, in a busy CI run, and then there was no request to send again.
        # 160 checks of 0.3 s on 2 replicas x 4 at a time take ~7 s
        thread, out, expected = _burst(pool, 160)
        victim = _busy_replica(pool.app, deadline_s=30)
        ray.kill(victim, no_restart=True)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the step hung after a replica died"
        # every score came back, in order, although the victim died with checks in flight: they
        # were sent again, by the pool (the error reached it: Scores.retries counts them) or by
        # Serve's router (Ray 2.60 re-routes what it had not handed over yet). Which of the two
        # happens is a matter of timing, so neither is asserted
        assert [s.reward for s in out["scores"]] == expected
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_request_that_times_out_is_sent_again(ray_local, tmp_path):
    marker = tmp_path / "hung-once"
    pool = _pool(tmp_path, "reward.pool.request_timeout_s=3", "reward.pool.max_retries=2",
                 "reward.components={correct: 0, 'reward_fns:hang_once': 1.0}")
    try:
        t = time.monotonic()
        scores = pool.score([{"answer": "1", "marker": str(marker)}], ["1"])
        assert [s.reward for s in scores] == [1.0]
        assert scores.retries == 1 and marker.exists()
        assert 3 <= time.monotonic() - t < 20
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_request_whose_replica_dies_is_sent_again(ray_local, tmp_path):
    """The replica dies while it works on the request (the check kills its process): the error
    reaches the pool, which sends the request again, to the other replica."""
    marker = tmp_path / "crashed-once"
    pool = _pool(tmp_path, "reward.pool.min_replicas=2", "reward.pool.max_replicas=2",
                 "reward.components={correct: 0, 'reward_fns:crash_once': 1.0}")
    try:
        scores = pool.score([{"answer": "1", "marker": str(marker)}], ["1"])
        assert [s.reward for s in scores] == [1.0]
        # one resend, or two if the router had not yet dropped the dead replica when it went
        assert 1 <= scores.retries <= 2 and marker.exists()
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_retries_run_out_with_a_clear_error(ray_local, tmp_path):
    pool = _pool(tmp_path, "reward.pool.request_timeout_s=1", "reward.pool.max_retries=1",
                 "reward.components={correct: 0, 'reward_fns:hang_always': 1.0}")
    try:
        with pytest.raises(RuntimeError, match=r"1 request\(s\) failed after 1 retries \(no answer within 1s\)"):
            pool.score([{"answer": "1"}], ["1"])
    finally:
        pool.shutdown()


def test_request_budget_leaves_room_for_one_more_comparison():
    from grpo_ray.roles.verifier_pool import request_budget

    assert request_budget(load_config(None, []).reward) == 120 - 2 * 5 - 1
    assert request_budget(load_config(None, ["reward.pool.request_timeout_s=8", "reward.math.timeout_s=3"]).reward) == 4


@pytest.mark.slow
def test_a_request_of_slow_math_answers_is_answered_within_its_timeout(ray_local, tmp_path):
    """Six answers that each keep math-verify busy past its 1 s limit (plus a restart each) in one
    request: ~15 s of work against an 8 s request timeout. The replica spends its budget and
    scores the rest 0 with the reason; without the budget the request timed out and, with no
    retries left, the step failed."""
    from test_verifier_math import HOSTILE

    pool = _pool(tmp_path, "reward.pool.request_timeout_s=8", "reward.pool.max_retries=0", "reward.math.timeout_s=1",
                 f"reward.pool.chunk_size={len(HOSTILE)}")
    try:
        pool.score([{"answer": "1/2"}], [r"\boxed{0.5}"])  # the replica is up and its math-verify started
        t = time.monotonic()
        scores = pool.score([{"answer": "3"}] * len(HOSTILE), HOSTILE)
        assert time.monotonic() - t < 8 and scores.retries == 0
        assert all(s.reward == 0.0 for s in scores)
        assert any(s.reason.startswith("not compared: the request's time budget") for s in scores)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_a_first_burst_of_cheap_checks_does_not_scale_the_pool(ray_local, tmp_path):
    """Auto chunks: the first call measures a check's cost on one small request, then sends the
    rest in a few large ones. Cut into requests of 8 before the cost was known, the default job's
    first 1024 math checks read as load and started 3 replicas that slowed the next steps."""
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.roles.verifier_pool import VerifierPool

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "reward.pool.upscale_delay_s=0.5"])
    # chunk_size 0 (auto), 1-4 replicas
    pool = VerifierPool(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
    try:
        records = [{"answer": str(i)} for i in range(1024)]
        responses = [f"#### {i if i % 3 else i + 1}" for i in range(1024)]
        peak, ends = 1, None
        for _ in range(3):  # like the evaluation and first steps of a run
            scores = pool.score(records, responses)
            assert [s.reward for s in scores] == [1.0 if i % 3 else 0.0 for i in range(1024)]
        ends = time.monotonic() + 4.0  # the autoscaler acts within upscale_delay_s + a metrics round
        while time.monotonic() < ends:
            peak = max(peak, sum(pool.replicas().values()))
            time.sleep(0.25)
        assert pool.check_s is not None and pool.check_s < 0.01
        assert peak == 1, f"cheap checks scaled the pool to {peak} replicas"
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_each_generator_part_is_scored_the_moment_it_arrives(ray_local, tmp_path):
    """rollout.sample_and_score: the first generator's part goes to the pool while the second
    is still sampling (two stand-in generator actors that finish 4 s apart, behind a real
    GeneratorFleet; the check's reward is the time it ran), and collect() gives the scores back
    in part order. A part sampled with other weights (a restarted generator) is never sent."""
    import types

    import ray

    from grpo_ray.core.records import Rollout
    from grpo_ray.driver.rollout import collect_scores, sample_and_score
    from grpo_ray.roles.fleet import Arrived, GeneratorFleet, Launch, Sampling

    @ray.remote
    class StandIn:
        def __init__(self, delay, version=0):
            self.delay, self.version = delay, version

        def generate(self, prompts, *, n, seed, sent, **_):
            time.sleep(self.delay)
            texts = [p for p in prompts for _ in range(n)]
            # sample_s carries the time the part was returned
            return Rollout([[1]] * len(texts), [[2]] * len(texts), [[-0.5]] * len(texts), texts,
                           [False] * len(texts), self.version, 0.0, time.time())

    pool = _pool(tmp_path)
    try:
        cfg = load_config(None, [f"run.output_dir={tmp_path}", "algo.group_size=2"])
        records = [{"task": "reward_fns:now", "answer": "", "prompt": p} for p in ("a", "c")]
        fleet = GeneratorFleet([StandIn.remote(0.0), StandIn.remote(4.0)])
        roles = types.SimpleNamespace(fleet=fleet, verifier=pool, reference=None, env=None)
        rollout, ref_pass, pending = sample_and_score(roles, cfg, records, seed=0)
        scored = [s.reward for s in collect_scores(pool, pending)]
        assert rollout.texts == ["a", "a", "c", "c"] and len(scored) == 4 and ref_pass is None
        done = rollout.sample_s  # the later part's return time (Rollout.concat keeps the max)
        assert max(scored[:2]) < done, "part 0 waited for part 1 before it was scored"
        assert min(scored[2:]) >= done
        # stale weights: no part is shown for scoring, and without learners to take the current
        # weights from, the fleet says why it cannot go on
        stale, events = GeneratorFleet([StandIn.remote(0.0, version=1)]), []
        with pytest.raises(RuntimeError, match="no learners"):
            for event in stale.stream(["e"], Sampling(n=1, temperature=1.0, max_new_tokens=4), seed=0):
                events.append(event)
        assert [type(e) for e in events] == [Launch] and not any(isinstance(e, Arrived) for e in events)
    finally:
        pool.shutdown()

def test_the_local_pool_scores_in_process_as_the_replicas_do():
    """reward.pool.mode=local: the same verifiers in the driver's process (no Ray, no Serve):
    scores in order with groups; checks that hold the verifier's thread past
    reward.pool.request_timeout_s fail the step naming the key (nothing to resend them to)."""
    import time

    from grpo_ray.config import load_config
    from grpo_ray.roles.local_verifier import LocalVerifierPool, start_verifier

    cfg = load_config(None, ["reward.pool.mode=local"])
    pool = start_verifier(cfg.reward, {}, task=cfg.data.verifier, name="t")
    try:
        assert isinstance(pool, LocalVerifierPool) and pool.app is None
        records = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
        scores = pool.score(records, ["#### 2", "#### 3", "The answer is 4", "5"], group_size=2)
        assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 0.0] and scores.retries == 0
        with pytest.raises(ValueError, match="2 records x group_size 3 != 4 responses"):
            pool.submit(records, ["a"] * 4, group_size=3)
    finally:
        pool.shutdown()
    cfg = load_config(None, ["reward.pool.mode=local", "reward.pool.request_timeout_s=1",
                             "reward.components={correct: 0, 'reward_fns:hang_always': 1.0}"])
    pool = start_verifier(cfg.reward, {}, task=cfg.data.verifier, name="t")
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"no answer within 1s \(reward.pool.request_timeout_s\)"):
            pool.score([{"prompt": "p", "answer": "1"}], ["1"])
        assert time.monotonic() - t0 < 5
    finally:
        pool.shutdown()


def test_a_local_pool_is_refused_with_an_environment():
    from grpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.pool.mode=local with env.name='python'"):
        load_config(None, ["reward.pool.mode=local", "env.name=python"])
