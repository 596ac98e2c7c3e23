"""User reward functions ('module:function') under a time limit (reward.user.timeout_s), and
reward components that raise, time out or return NaN: each failure scores 0 with the reason,
is counted per step (reward/<name>/errors), said once per component, and a component that fails
on every completion of a step stops the run (issue 28, "no silent failure")."""
from __future__ import annotations

import json
import os
import time

import pytest

from grpo_ray.config import load_config
from grpo_ray.verifiers import Verifier, combine, verify

USER = {"user": {"timeout_s": 1.0}}


def test_a_raising_component_scores_zero_and_names_itself():
    s = combine({"answer": "3"}, "#### 3", {"correct": 1.0, "reward_fns:raise_on_odd": 1.0}, USER)
    assert s.reward == 1.0 and s.components["reward_fns:raise_on_odd"] == 0.0
    assert list(s.errors) == ["reward_fns:raise_on_odd"]
    text = s.errors["reward_fns:raise_on_odd"]
    assert text.startswith("reward_fns:raise_on_odd raised ValueError: bad input 3"), text
    assert "reward_fns.py" in text  # where: the traceback's innermost frame
    ok = combine({"answer": "2"}, "#### 2", {"correct": 1.0, "reward_fns:raise_on_odd": 1.0}, USER)
    assert ok.errors == {} and ok.reward > 1.0


def test_a_user_task_that_raises_is_an_error_of_the_correct_component():
    s = combine({"answer": "3", "task": "reward_fns:always_raises"}, "x", {"correct": 1.0}, USER)
    assert s.reward == 0.0 and "verifier error: ValueError: bad input" in s.reason
    assert s.errors["correct"].startswith("reward_fns:always_raises raised ValueError: bad input")


def test_a_sleeping_function_scores_zero_after_its_time_limit_and_the_next_call_works():
    t = time.monotonic()
    s = verify({"answer": "1", "task": "reward_fns:sleep_forever"}, "1", USER)
    assert time.monotonic() - t < 5
    assert s.reward == 0.0 and "timeout after 1 s" in s.reason
    assert s.errors == {"reward_fns:sleep_forever": "reward_fns:sleep_forever: timeout after 1 s"}
    # the hung call was killed with its worker; a fresh one answers the next call
    assert verify({"answer": "1", "task": "reward_fns:constant"}, "1", USER).reward == 0.5


def test_a_request_budget_bounds_slow_user_calls():
    """Verifier.score's deadline (the pool's request budget) limits user calls as it limits math
    comparisons: four calls of a hung function against a 1.5 s budget take ~1.5 s, not 4 time
    limits, and the ones the budget left no time for are not run."""
    v = Verifier({"correct": 0.0, "reward_fns:sleep_forever": 1.0}, {"user": {"timeout_s": 1.0}})
    t = time.monotonic()
    out = v.score([{"answer": "1"}] * 4, ["1"] * 4, deadline=time.monotonic() + 1.5)
    assert time.monotonic() - t < 3
    assert [s.reward for s in out] == [0.0] * 4 and all(s.errors for s in out)
    assert "timeout after 1 s" in out[0].reason
    assert any("time budget" in s.reason for s in out[1:])


def test_nan_from_a_component_scores_zero_and_counts_as_an_error():
    s = combine({"answer": "1"}, "#### 1", {"correct": 1.0, "reward_fns:nan_reward": 1.0}, USER)
    assert s.reward == 1.0 and s.components["reward_fns:nan_reward"] == 0.0
    assert "returned nan, not a finite number" in s.errors["reward_fns:nan_reward"]


def test_errors_are_counted_per_step_said_once_and_a_component_failing_everywhere_stops():
    from grpo_ray.driver.step import component_means, reward_error_messages, reward_errors

    v = Verifier({"correct": 1.0, "reward_fns:raise_on_odd": 1.0}, USER)
    scores = v.score([{"answer": str(i)} for i in range(4)], [f"#### {i}" for i in range(4)])
    m = component_means(scores)
    assert m["reward/reward_fns:raise_on_odd/errors"] == 2 and m["reward/correct/errors"] == 0
    said: set = set()
    messages, stop = reward_error_messages(3, reward_errors(scores), said)
    assert stop is None and len(messages) == 1
    assert messages[0].startswith("reward component reward_fns:raise_on_odd raised ValueError: bad input 1")
    assert "first of 2 of 4 completions in step 3" in messages[0] and "reward_fns.py" in messages[0]
    messages, stop = reward_error_messages(4, reward_errors(scores), said)
    assert messages == [] and stop is None  # said once per component
    every = Verifier({"correct": 1.0, "reward_fns:always_raises": 1.0}, USER).score([{"answer": "1"}] * 2, ["1"] * 2)
    messages, stop = reward_error_messages(5, reward_errors(every), said)
    assert len(messages) == 1 and "reward_fns:always_raises raised ValueError: bad input" in stop
    assert "every completion of step 5" in stop


def test_user_timeout_is_configured():
    cfg = load_config(None, ["reward.user.timeout_s=2.5"])
    assert cfg.reward.user.timeout_s == 2.5
    assert load_config(None, []).reward.user.timeout_s == 10.0
    from grpo_ray.verifiers import options

    assert options(cfg.reward)["user"] == {"timeout_s": 2.5}


def test_a_trivial_user_function_is_cheap_to_call():
    """The per-call cost of the time limit (a worker process, pickled over pipes)."""
    v = Verifier({"correct": 0.0, "reward_fns:constant": 1.0}, USER)
    v.score([{"answer": "1"}], ["1"])  # the worker started and the module imported
    n = 500
    t = time.perf_counter()
    out = v.score([{"answer": "1"}] * n, ["1"] * n)
    rate = n / (time.perf_counter() - t)
    assert all(s.reward == 0.5 for s in out)
    assert rate > 300, f"{rate:.0f} calls/s"


@pytest.mark.slow
def test_a_hung_user_function_times_out_in_the_pool_without_a_resend(ray_local, tmp_path):
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.roles.verifier_pool import VerifierPool

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "reward.pool.chunk_size=4", "reward.user.timeout_s=1",
                             "reward.pool.request_timeout_s=20", "reward.pool.max_retries=0",
                             "reward.components={correct: 0, 'reward_fns:sleep_forever': 1.0}"])
    pool = VerifierPool(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
    try:
        t = time.monotonic()
        scores = pool.score([{"answer": "1"}] * 4, ["1"] * 4)
        assert time.monotonic() - t < 15 and scores.retries == 0
        assert all(s.reward == 0.0 and "timeout after 1 s" in s.reason for s in scores)
        assert all(s.errors == {"reward_fns:sleep_forever": "reward_fns:sleep_forever: timeout after 1 s"}
                   for s in scores)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_a_run_whose_reward_function_always_raises_stops_with_a_clear_message(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.config import ConfigError
    from grpo_ray.driver.train import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=2", "algo.group_size=2", "train.steps=2", "train.eval_every=0",
        "eval.num_prompts=2", "eval.samples=2", "eval.ks=[1]", "learner.micro_batch_size=4", "rollout.num_generators=1",
        f"run.output_dir={tmp_path}", "run.name=raises", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={data}", "data.eval_fraction=0.25", "reward.components.reward_fns:always_raises=1.0"])
    with pytest.raises(ConfigError, match=r"reward component reward_fns:always_raises failed on every completion "
                                          r"of step 1 .*ValueError: bad input"):
        train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "raises", "metrics.jsonl"))]
    step1 = [r for r in rows if r.get("step") == 1 and "reward/mean" in r]
    assert step1 and step1[0]["reward/reward_fns:always_raises/errors"] == 4
    warned = [r["message"] for r in rows if r.get("event") == "warning"]
    assert any(w.startswith("reward component reward_fns:always_raises raised ValueError: bad input") for w in warned)
