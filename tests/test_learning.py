"""The default job learns: held-out pass@1 rises by >= 30 points, and the retention set
(subtraction) holds (slow, ~3 min on 2 cores)."""
import json
import os

import pytest

from grpo_ray.config import load_config

pytestmark = pytest.mark.slow


def test_default_job_raises_heldout_pass_at_1(ray_local, tmp_path):
    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", [f"run.output_dir={tmp_path}"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/pass@1" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == cfg.train.steps  # no KL stop in the default job
    assert 0.05 < first["eval/pass@1"] < 0.6, first  # the warm-started base is sometimes right
    assert last["eval/pass@1"] - first["eval/pass@1"] >= 0.30, (first, last)
    # beside the gain, a skill GRPO does not train (subtraction) at every evaluation, and held
    assert all("eval/subtraction/pass@1" in r for r in evals), evals
    assert first["eval/subtraction/pass@1"] > 0.3, first  # the warm start taught it
    verdicts = [r["message"] for r in rows if r.get("event") == "retention_verdict"]
    assert len(verdicts) == 1 and verdicts[0].startswith("retention: subtraction held"), verdicts
    train_rows = [r for r in rows if "reward/mean" in r]
    # the policy learns to show its work: responses get longer as reward rises
    assert train_rows[-1]["response_length/mean"] > train_rows[0]["response_length/mean"]
