"""grpo-ray plot and the metric sinks (JSONL + TensorBoard), on a metrics file written by hand."""
import json
import os
import subprocess
import sys

import pytest

from grpo_ray.driver.plots import load_metrics, plot_run
from grpo_ray.driver.tracking import Tracker


def _run(tmp_path):
    run = tmp_path / "run"
    tracker = Tracker(str(run), tensorboard=True)
    tracker.write({"step": 0, "eval/pass@1": 0.3, "eval/pass@10": 0.9})
    for step in (1, 2, 3):
        tracker.write({"step": step, "reward/mean": 0.1 * step, "reward/std": 0.4, "kl": 0.01 * step,
                       "clip/low": 0.0, "clip/high": 0.0, "response_length/mean": 8 + step,
                       "response_length/max": 16, "time/generate": 0.5, "time/learner": 0.4, "grad_norm": float("nan")})
    tracker.write({"step": 3, "event": "kl_rollback", "message": "back to 2"})
    tracker.write({"step": 3, "reward/mean": 0.9, "reward/std": 0.4, "kl": 0.02})  # the re-run step 3
    tracker.write({"step": 3, "eval/pass@1": 0.5, "eval/pass@10": 0.95})
    tracker.close()
    return str(run)


def test_jsonl_and_tensorboard_get_every_record(tmp_path):
    run = _run(tmp_path)
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(lines) == 7 and lines[1]["grad_norm"] is None  # NaN written as null
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([0.1, 0.2, 0.3, 0.9])
    assert [e.step for e in acc.Scalars("eval/pass@1")] == [0, 3]


def test_plot_uses_the_last_occurrence_of_a_step_and_writes_pngs(tmp_path):
    run = _run(tmp_path)
    train, evals = load_metrics(run)
    assert train["step"].tolist() == [1, 2, 3] and train["reward/mean"].tolist()[-1] == 0.9
    assert evals["eval/pass@1"].tolist() == [0.3, 0.5]
    paths = plot_run(run, kl_stop=0.1)
    assert sorted(os.path.basename(p) for p in paths) == ["clip.png", "kl.png", "length.png", "pass_at_k.png",
                                                           "reward.png", "timings.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    assert not [f for f in os.listdir(os.path.dirname(paths[0])) if "tmp" in f]


def test_plot_cli_names_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "plot", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path / 'nope'}/metrics.jsonl does not exist" in proc.stderr


def test_report_cli_names_a_missing_run(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "grpo_ray", "report", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "metrics.jsonl does not exist" in r.stderr, r.stderr


def test_report_of_a_run_dir_embeds_its_charts_and_lists_config_changes(tmp_path):
    from grpo_ray.driver.plots import plot_run
    from grpo_ray.driver.report import write_report

    rows = [{"step": 0, "eval/pass@1": 0.2, "eval/keep/pass@1": 0.5},
            {"step": 1, "reward/mean": 0.3, "reward/std": 0.4, "kl": 0.01, "clip/low": 0, "clip/high": 0,
             "response_length/mean": 5.0, "time/step": 1.0},
            {"step": 1, "event": "warning", "message": "low reward variance <0.3> & more"},
            {"step": 2, "eval/pass@1": 0.6, "eval/keep/pass@1": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text("algo:\n  beta: 0.01\neval:\n  sets:\n  - {name: keep, path: k.jsonl, "
                                          "retention: true}\n")
    plot_run(str(tmp_path))
    page = open(write_report(str(tmp_path))).read()
    assert "<td>algo.beta</td><td>0.01</td><td>0.001</td>" in page
    assert "<td>eval/pass@1</td><td>0.200</td><td>0.600 (step 2)</td><td>0.600</td>" in page
    assert "<td>eval/keep/pass@1</td><td>0.500</td><td>0.500 (step 0)</td><td>0.400</td><td>retention</td>" in page
    assert "low reward variance &lt;0.3&gt; &amp; more" in page
    assert page.count("data:image/png;base64,") == len(os.listdir(tmp_path / "plots")) > 0
