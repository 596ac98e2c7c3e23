"""Multi-faceted rewards: components, weights, config merging, and pass@k counting correctness."""
import pytest

from grpo_ray.config import ConfigError, load_config
from grpo_ray.driver.evaluation import correctness
from grpo_ray.core.records import Score
from grpo_ray.verifiers import Verifier, combine, format_reward, verify

GOOD = "<think>6*7 is 42</think>\n<answer>#### 42</answer>"


@pytest.mark.parametrize("response, ok", [
    (GOOD, True),
    ("  <think>a\nb</think><answer>1</answer>\n", True),
    ("<think>x</think>", False),
    ("<answer>1</answer>", False),
    ("preamble <think>x</think><answer>1</answer>", False),
    ("<think>x</think><answer>1</answer> trailing", False),
])
def test_format_reward(response, ok):
    assert format_reward({}, response).reward == (1.0 if ok else 0.0)


def test_weighted_sum_keeps_each_component():
    rec = {"prompt": "6*7?", "answer": "42", "task": "math"}
    s = combine(rec, GOOD, {"correct": 1.0, "format": 0.1})
    assert s.reward == pytest.approx(1.1) and s.components == {"correct": 1.0, "format": 1.0}
    s = combine(rec, GOOD.replace("42", "41"), {"correct": 1.0, "format": 0.1})
    assert s.reward == pytest.approx(0.1) and "41 != 42" in s.reason
    s = combine(rec, "#### 42", {"correct": 1.0, "format": 0.1})
    assert s.reward == pytest.approx(1.0) and s.components["format"] == 0.0


def test_user_component_and_broken_component_never_raise(tmp_path, monkeypatch):
    (tmp_path / "facets.py").write_text("def half(r, t):\n    return 0.5\ndef boom(r, t):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = combine({"answer": "1"}, "#### 1", {"correct": 1.0, "facets:half": 2.0, "facets:boom": 1.0})
    assert s.reward == pytest.approx(2.0)
    assert s.components == {"correct": 1.0, "facets:half": 0.5, "facets:boom": 0.0}


def test_a_user_reward_of_nan_scores_zero_with_the_reason(tmp_path, monkeypatch):
    # one NaN reward makes its group's advantages NaN, then the loss and every weight
    (tmp_path / "bad_fns.py").write_text("def nan(r, t):\n    return float('nan')\ndef inf(r, t):\n"
                                         "    return float('inf')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = verify({"task": "bad_fns:nan"}, "anything")
    assert s.reward == 0.0 and "bad_fns:nan returned nan, not a finite number" in s.reason
    s = combine({"answer": "1"}, "#### 1", {"correct": 1.0, "bad_fns:inf": 1.0})
    assert s.reward == 1.0 and s.components["bad_fns:inf"] == 0.0


def test_verifier_drops_zero_weights_and_defaults_to_correctness():
    assert Verifier().components == {"correct": 1.0}
    assert Verifier({"correct": 1.0, "format": 0}).components == {"correct": 1.0}
    out = Verifier({"correct": 1.0, "format": 0.5}).score([{"answer": "42"}], [GOOD])
    assert out[0].reward == pytest.approx(1.5)


def test_config_components_merge_and_validate():
    cfg = load_config(None, ["reward.components.format=0.1"])
    assert cfg.reward.components == {"correct": 1.0, "format": 0.1}
    cfg = load_config(None, ["reward.components={correct: 1.0, pkg.mod:fn: 0.2}"])
    assert cfg.reward.components["pkg.mod:fn"] == 0.2
    with pytest.raises(ConfigError, match="reward.components key 'formt'"):
        load_config(None, ["reward.components.formt=0.1"])
    with pytest.raises(ConfigError, match="reward.components.format='high'"):
        load_config(None, ["reward.components.format=high"])
    with pytest.raises(ConfigError, match="every weight is 0"):  # nothing could score: each request failed
        load_config(None, ["reward.components.correct=0"])


def test_pass_at_k_counts_correctness_not_the_weighted_sum():
    assert correctness(Score(1.1, "", {"correct": 1.0, "format": 1.0})) == 1.0
    assert correctness(Score(0.1, "", {"correct": 0.0, "format": 1.0})) == 0.0
    assert correctness(Score(1.0, "")) == 1.0
