import json
import math
from fractions import Fraction

import pytest
import torch
from grpo_ray.core.algorithm import group_advantages

from grpo_ray.core.metrics import (MetricsLog, advantage_variance, mean_pass_at_k, pass_at_k, reward_stats,
                              threshold_warnings)


def _exact_pass_at_k(n, c, k):
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)        # pass@1 is c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(16, 1, 10) == pytest.approx(10 / 16)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in [(1000, 3, 100), (500, 1, 10), (200, 150, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(_exact_pass_at_k(n, c, k), rel=1e-9)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@10"):
        pass_at_k(5, 1, 10)


def test_mean_pass_at_k_averages_problems():
    assert mean_pass_at_k([4, 4], [0, 4], 1) == pytest.approx(0.5)


def test_reward_stats_per_group():
    s = reward_stats(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert s["reward/mean"] == pytest.approx(0.75)
    assert s["reward/std"] == pytest.approx(0.25)  # mean of within-group stds 0.5 and 0
    assert s["reward/frac_zero_std"] == 0.5
    assert s["reward/frac_all_max"] == 0.5 and s["reward/frac_all_min"] == 0.0


def test_all_solved_and_all_failed_groups_are_judged_by_correctness():
    """A batch with no correct answer is all failed, not also all solved; a format bonus on
    all-wrong groups is no solution."""
    s = reward_stats(torch.zeros(8), group_size=4)
    assert (s["reward/frac_all_max"], s["reward/frac_all_min"]) == (0.0, 1.0)
    s = reward_stats(torch.ones(8), group_size=4)
    assert (s["reward/frac_all_max"], s["reward/frac_all_min"]) == (1.0, 0.0)
    rewards = torch.tensor([0.1] * 4 + [1.1] * 4 + [0.1, 1.1, 0.1, 0.1])  # correct + 0.1 format
    s = reward_stats(rewards, 4, correct=(rewards > 1).float())
    assert (s["reward/frac_all_max"], s["reward/frac_all_min"]) == pytest.approx((1 / 3, 1 / 3))


def test_zero_std_groups_are_the_groups_with_zero_advantages():
    # 0.1 x4: float32's std is ~1e-8, not 0; the group gets zero advantages and counts as zero-std.
    # 0.1 x3 + 0.1000005: a real (tiny) difference, normalised to +-1 advantages: not zero-std.
    r = torch.tensor([0.1] * 4 + [0.1, 0.1, 0.1, 0.1000005])
    s = reward_stats(r, group_size=4)
    assert s["reward/frac_zero_std"] == 0.5
    assert torch.equal(group_advantages(r, 4)[:4], torch.zeros(4))
    assert group_advantages(r, 4)[4:].abs().min() > 0.5


def test_advantage_variance():
    assert advantage_variance(torch.tensor([-1.0, 1.0, 1.0, -1.0, 0, 0, 0, 0])) == pytest.approx(0.5)


def test_threshold_warnings_follow_the_guide():
    ok = {"reward/std": 0.5, "advantage/variance": 1.0, "kl": 0.01}
    assert threshold_warnings(ok, kl_stop=0.1) == {}
    low = list(threshold_warnings({**ok, "reward/std": 0.1}, kl_stop=0.1).values())
    assert len(low) == 1 and "low reward variance" in low[0] and "temperature" in low[0]
    assert "high reward variance" in threshold_warnings({**ok, "reward/std": 2.5}, 0.1)["high_reward_std"]
    assert "advantage variance" in threshold_warnings({**ok, "advantage/variance": 0.2}, 0.1)["advantage_variance"]
    assert "KL" in threshold_warnings({**ok, "kl": 0.2}, 0.1)["kl"]


def test_metrics_log_appends_and_writes_nan_as_null(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    log.write({"step": 1, "kl": float("nan")})
    log.close()
    log = MetricsLog(path)
    log.write({"step": 2, "kl": 0.5})
    log.close()
    rows = [json.loads(line) for line in open(path)]
    assert rows == [{"step": 1, "kl": None}, {"step": 2, "kl": 0.5}]


def test_monitor_reports_warnings_once_and_stops_on_sustained_kl_only():
    from grpo_ray.core.metrics import Monitor

    mon = Monitor(kl_stop=0.1, kl_window=3)
    ok = {"reward/std": 0.5, "advantage/variance": 1.0, "kl": 0.01}
    assert mon.check(ok) == ([], None)
    new, stop = mon.check({**ok, "reward/std": 0.1})
    assert len(new) == 1 and stop is None
    assert mon.check({**ok, "reward/std": 0.1}) == ([], None)  # persisting: not repeated
    mon.check(ok)
    assert len(mon.check({**ok, "reward/std": 0.1})[0]) == 1   # returns after clearing: reported again
    # a persisting warning whose measured value changes is still the same warning
    assert len(mon.check({**ok, "advantage/variance": 0.2})[0]) == 1
    assert mon.check({**ok, "advantage/variance": 0.3})[0] == []
    # one outlier batch (k3's heavy tail) does not stop the run; a sustained drift does
    mon = Monitor(kl_stop=0.1, kl_window=3)
    for kl in (0.02, 0.9, 0.03):
        _, stop = mon.check({**ok, "kl": kl})
    assert stop is None
    for kl in (0.2, 0.15):
        _, stop = mon.check({**ok, "kl": kl})
    assert stop is not None and "algo.kl_stop=0.1" in stop


def test_without_a_kl_guard_nothing_reads_the_kl():
    """algo.kl_stop=null (with beta 0 no reference runs and the learner logs no kl)."""
    from grpo_ray.core.metrics import Monitor, threshold_warnings
    from grpo_ray.driver.outputs import summary_line

    mon = Monitor(kl_stop=None, kl_window=1)
    for _ in range(3):
        assert mon.check({"reward/std": 0.5, "advantage/variance": 1.0}) == ([], None)
    assert mon.check({"reward/std": 0.5, "advantage/variance": 1.0, "kl": 5.0}) == ([], None)
    assert threshold_warnings({"reward/std": 0.5, "advantage/variance": 1.0, "kl": 5.0}, None) == {}
    m = {"step": 1, "reward/mean": 0.5, "reward/std": 0.4, "clip/low": 0.0, "clip/high": 0.0, "entropy": 1.0,
         "response_length/mean": 9.0, "time/step": 1.0, **{f"time/{p}": 0.1 for p in
                                                            ("generate", "verify", "reference", "learner", "sync")}}
    assert "| clip 0.000/0.000 |" in summary_line(m, 5) and "kl" not in summary_line(m, 5)
    assert "| kl 0.0300 | clip" in summary_line({**m, "kl": 0.03}, 5)


def test_monitor_length_collapse_and_explosion():
    from grpo_ray.core.metrics import Monitor

    mon = Monitor(kl_stop=0.1, kl_window=3)
    ok = {"reward/std": 0.5, "advantage/variance": 1.0, "kl": 0.01, "truncated/frac": 0.0}
    for n in (10, 12, 14):  # baseline: 12 tokens
        assert mon.check({**ok, "response_length/mean": n})[0] == []
    assert mon.check({**ok, "response_length/mean": 7})[0] == []
    (w,), _ = mon.check({**ok, "response_length/mean": 5.9})
    assert w.startswith("response length collapsed to 5.9 tokens from 12.0")
    (w,), _ = mon.check({**ok, "response_length/mean": 25})
    assert w.startswith("response length grew to 25.0 tokens from 12.0") and "overlong=penalty" in w
    assert mon.check({**ok, "response_length/mean": 13})[0] == []  # back to normal: cleared
    (w,), _ = mon.check({**ok, "response_length/mean": 13, "truncated/frac": 0.6})
    assert "(60% truncated)" in w


def test_monitor_reward_hacking_signal_and_state_round_trip():
    from grpo_ray.core.metrics import Monitor

    mon = Monitor(kl_stop=0.1, kl_window=3)
    ok = {"reward/std": 0.5, "advantage/variance": 1.0, "kl": 0.01}
    assert mon.check_eval(0.40) == []  # step 0: nothing to compare with
    for r in (0.30, 0.32):
        mon.check({**ok, "reward/mean": r})
    assert mon.check_eval(0.45) == []  # reward and pass@1 both up: learning
    for r in (0.50, 0.60):
        mon.check({**ok, "reward/mean": r})
    state = mon.state_dict()
    (w,) = mon.check_eval(0.30)
    assert "possible reward hacking" in w and "0.310 -> 0.550" in w and "0.450 -> 0.300" in w
    again = Monitor(kl_stop=0.1, kl_window=3)
    again.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint's state.json
    assert again.check_eval(0.30) == [w]


def test_combine_parts_sums_losses_weights_means_and_keeps_extremes():
    from grpo_ray.core.metrics import combine_parts

    parts = [{"loss": 0.25, "pg_loss": 0.2, "kl": 0.1, "ratio/max": 1.5, "ratio/min": 0.9, "tokens": 1.0},
             {"loss": 0.5, "pg_loss": 0.3, "kl": 0.4, "ratio/max": 1.1, "ratio/min": 0.7, "tokens": 3.0}]
    out = combine_parts(parts)
    assert out == {"loss": 0.75, "pg_loss": 0.5, "kl": pytest.approx((0.1 + 3 * 0.4) / 4),
                   "ratio/max": 1.5, "ratio/min": 0.7, "tokens": 4.0}


def test_large_rewards_keep_their_differences():
    """Issue 28 #4: a reward component of ~1e9 lost the +1 between answers in float32 (1e9+1 ==
    1e9): reward std 0, advantages 0, no learning, while the console showed 999999616. Rewards,
    their statistics and the advantages are float64."""
    from types import SimpleNamespace

    from grpo_ray.config import load_config
    from grpo_ray.core.algorithm import group_advantages
    from grpo_ray.core.metrics import reward_stats
    from grpo_ray.core.records import Score
    from grpo_ray.driver.step import shaped_rewards

    cfg = load_config(None, ["algo.group_size=2"])
    scores = [Score(1e9 + 1, "a"), Score(1e9, "b")]
    rewards, _ = shaped_rewards(cfg, SimpleNamespace(response_ids=[[1], [1]]), scores)
    assert rewards.tolist() == [1e9 + 1, 1e9]
    assert group_advantages(rewards, 2).tolist() == pytest.approx([1.0, -1.0])
    stats = reward_stats(rewards, 2)
    assert stats["reward/mean"] == 1e9 + 0.5 and stats["reward/std"] == 0.5 and stats["reward/frac_zero_std"] == 0.0
