"""`grpo-ray eval`: a real run of the command (generators + verifier pool on a local Ray), and
the pure helpers (dedupe, atomic result files)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_ray.config import ConfigError
from grpo_ray.data.datasets import DataError, dedupe_against, drop_training_prompts
from grpo_ray.driver.evaluation import write_results
from grpo_ray.core.metrics import mean_pass_at_k

REPO = Path(__file__).resolve().parents[1]


def test_dedupe_against_training_prompts():
    train = [{"prompt": "Q: 1+1=?"}, {"prompt": "Q:  2+2=? "}]
    held = [{"prompt": "Q: 1+1=?"}, {"prompt": "Q: 2+2=?"}, {"prompt": "Q: 3+3=?"}]
    kept, dupes = dedupe_against(held, train)
    assert [r["prompt"] for r in kept] == ["Q: 3+3=?"] and dupes == ["Q: 1+1=?", "Q: 2+2=?"]


def test_drop_training_prompts_warns_with_what_it_dropped_and_refuses_an_empty_held_out_set():
    train = [{"prompt": f"Q: {i}"} for i in range(5)]
    kept, warning = drop_training_prompts([{"prompt": "Q: 9"}, *train], train, "t.jsonl")
    assert kept == [{"prompt": "Q: 9"}]
    assert warning == "dropped 5 evaluation prompt(s) that are also in t.jsonl: 'Q: 0'; 'Q: 1'; 'Q: 2' ..."
    assert drop_training_prompts([{"prompt": "Q: 9"}], train, "t.jsonl") == ([{"prompt": "Q: 9"}], None)
    with pytest.raises(DataError, match="every held-out prompt is also a training prompt of t.jsonl"):
        drop_training_prompts(train[:2], train, "t.jsonl")


def test_overrides_may_follow_options(monkeypatch):
    """argparse alone took `train --resume train.steps=40` for an unknown argument."""
    from grpo_ray import cli

    seen = []
    monkeypatch.setattr(cli, "_train", lambda a: seen.append((a.config, a.overrides, a.resume, a.address)))
    cli.main(["train", "configs/default.yaml", "--resume", "train.steps=40"])
    cli.main(["train", "train.steps=3", "--address", "auto", "algo.beta=0.01"])
    assert seen == [("configs/default.yaml", ["train.steps=40"], True, None),
                    ("configs/default.yaml", ["train.steps=3", "algo.beta=0.01"], False, "auto")]
    with pytest.raises(SystemExit):
        cli.main(["train", "--bogus"])


def test_eval_reads_the_configs_prompt_and_answer_fields(tmp_path, monkeypatch):
    """Without --prompt-key/--answer-key, `grpo-ray eval` uses data.prompt_key/answer_key (a
    GSM8K config's `question`), as its error message about a missing field tells the user to set."""
    from grpo_ray import cli
    from grpo_ray.driver import evaluation

    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "solution": "#### 2"}) + "\n")
    got = []
    monkeypatch.setattr(evaluation, "eval_model", lambda cfg, model, records, out: (got.append(records), []))
    cli.main(["eval", str(tmp_path), str(data), "data.prompt_key=question", "data.answer_key=solution"])
    assert [(r["prompt"], r["solution"]) for r in got[0]] == [("1+1?", "#### 2")]
    with pytest.raises(SystemExit):  # a flag still wins over the config
        cli.main(["eval", str(tmp_path), str(data), "--prompt-key", "q", "data.prompt_key=question"])


def test_write_results_leaves_no_temp_files(tmp_path):
    csv, js = write_results(str(tmp_path / "out"), [{"prompt": "a", "num_samples": 2, "num_correct": 1}],
                            {"eval/pass@1": 0.5})
    assert sorted(os.listdir(tmp_path / "out")) == ["pass_at_k.json", "results.csv"]
    assert json.load(open(js)) == {"eval/pass@1": 0.5}


@pytest.mark.slow
def test_eval_command_writes_per_problem_csv_and_pass_at_k(tiny_model_dir, tmp_path):
    import pandas as pd

    data, train = tmp_path / "held.jsonl", tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i), "task": "reward_fns:has_digit"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # two held-out prompts leak
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "eval", tiny_model_dir, str(data),
                           "--k", "1,4", "--samples", "6", "--max-new-tokens", "8", "--out", str(tmp_path / "ev"),
                           "--train-data", str(train)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 2 evaluation prompt(s) that are also in" in proc.stderr
    table = pd.read_csv(tmp_path / "ev" / "results.csv")
    assert len(table) == 6 and set(table["num_samples"]) == {6}
    assert table["prompt"].tolist() == [r["prompt"] for r in rows[2:]]
    result = json.load(open(tmp_path / "ev" / "pass_at_k.json"))
    for k in (1, 4):  # the summary is the unbiased estimator over the CSV's counts
        expected = mean_pass_at_k(table["num_samples"].tolist(), table["num_correct"].tolist(), k)
        assert result[f"eval/pass@{k}"] == pytest.approx(expected)
    assert 0 <= result["eval/pass@1"] <= result["eval/pass@4"] <= 1 and result["problems"] == 6


def test_eval_flags_not_given_leave_the_configs_values():
    """The flags' own defaults used to override --config: the HumanEval config's 20 samples and
    512 new tokens became 16 and 512, the GSM8K config's 768 new tokens 512."""
    import argparse

    from grpo_ray.cli import eval_config

    def args(**kw):
        return argparse.Namespace(**{"k": None, "samples": None, "temperature": None, "max_new_tokens": None,
                                     "config": None, "overrides": [], **kw})

    cfg = eval_config(args(config="configs/gsm8k_qwen2.5_1.5b_8gpu.yaml"))
    assert (cfg.eval.samples, cfg.eval.ks, cfg.rollout.max_new_tokens) == (16, [1, 10], 768)
    cfg = eval_config(args(config="configs/code_humaneval_8gpu.yaml", samples=4, k="1,2"))
    assert (cfg.eval.samples, cfg.eval.ks, cfg.rollout.max_new_tokens) == (4, [1, 2], 512)
    cfg = eval_config(args())  # no config: the CLI's defaults, which fit max_model_len 512
    assert (cfg.eval.samples, cfg.eval.ks, cfg.rollout.max_new_tokens) == (16, [1, 10], 256)
    with pytest.raises(ConfigError, match="--k='1,x'"):
        eval_config(args(k="1,x"))


def test_an_unwritable_out_folder_fails_before_any_sampling(tiny_model_dir, tmp_path):
    from grpo_ray.config import load_config
    from grpo_ray.driver.evaluation import eval_model

    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=r"--out '.*a_file/ev' is not writable"):  # no Ray, no engine started
        eval_model(load_config(None), tiny_model_dir, [{"prompt": "1+1?", "answer": "2"}], str(tmp_path / "a_file" / "ev"))


def test_the_compare_table_is_the_unbiased_estimator_over_each_models_rows(tmp_path):
    import csv

    from grpo_ray.core.metrics import pass_at_k
    from grpo_ray.driver.compare import bootstrap_interval, compare, write_compare

    rows = lambda counts: [{"prompt": f"p{i}", "num_samples": "8", "num_correct": str(c)}  # noqa: E731
                           for i, c in enumerate(counts)]
    base, final = [0, 1, 2, 0, 8, 3, 0, 1], [2, 4, 2, 1, 8, 6, 0, 5]
    table = compare({"base": rows(base), "final": rows(final)}, [1, 4], set_name="held")
    got = {(r["model"], r["k"]): r for r in table}
    for k in (1, 4):
        want = {name: sum(pass_at_k(8, c, k) for c in counts) / 8 for name, counts in (("base", base), ("final", final))}
        assert got["base", k]["pass@k"] == pytest.approx(want["base"])
        assert got["final", k]["pass@k"] == pytest.approx(want["final"])
        assert got["final", k]["diff"] == pytest.approx(want["final"] - want["base"])
        assert got["final", k]["ci95_low"] <= got["final", k]["diff"] <= got["final", k]["ci95_high"]
        assert "diff" not in got["base", k]
    assert bootstrap_interval(__import__("numpy").zeros(5)) == (0.0, 0.0)  # no difference, no width
    with pytest.raises(ValueError, match="'final' was evaluated on other prompts than 'base'"):
        compare({"base": rows(base), "final": rows(final)[::-1]}, [1])
    paths = write_compare(str(tmp_path), table)
    assert sorted(os.listdir(tmp_path)) == ["compare.csv", "compare.md", "compare_held.png"]
    back = list(csv.DictReader(open(paths[0])))
    assert [float(r["pass@k"]) for r in back] == pytest.approx([r["pass@k"] for r in table])
    assert "| held | final | 1 |" in open(paths[1]).read()


def test_eval_takes_several_named_models(tmp_path, monkeypatch):
    from grpo_ray import cli
    from grpo_ray.driver import evaluation

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit):  # both a MODEL_DIR and --model
        cli.main(["eval", str(tmp_path), str(data), "--model", f"a={tmp_path}"])
    for bad in (["--model", "a"], ["--model", f"a={tmp_path}", "--model", f"a={tmp_path}"]):
        with pytest.raises(SystemExit):
            cli.main(["eval", str(data), *bad])
    seen = []
    monkeypatch.setattr("grpo_ray.models.modeling.check_model_dir", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "eval_model", lambda cfg, model, records, out: (
        seen.append((model, out)), [{"prompt": "1+1?", "num_samples": 16, "num_correct": 3}]))
    # a dotted override after DATA: argparse reads DATA as MODEL_DIR, eval moves it back
    cli.main(["eval", "--model", "base=/m/base", "--model", "final=/m/final", str(data), "--out", str(tmp_path / "o"),
              "eval.samples=16"])
    assert seen == [("/m/base", str(tmp_path / "o" / "base")), ("/m/final", str(tmp_path / "o" / "final"))]
    assert (tmp_path / "o" / "compare.md").is_file()


@pytest.mark.slow
def test_eval_compares_models_with_the_same_seeds(tiny_model_dir, tmp_path):
    """The same model under two names: with the same seeds every problem gets the same counts,
    so the difference and its interval are exactly 0; the table is the estimator over each CSV."""
    import pandas as pd

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:has_digit"}) + "\n" for i in range(6)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "eval", "--model", f"a={tiny_model_dir}", "--model",
                           f"b={tiny_model_dir}", str(data), "--k", "1,2", "--samples", "4", "--max-new-tokens", "6",
                           "--out", str(tmp_path / "ev")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "ev" / "compare.csv")
    for k in (1, 2):
        for name in ("a", "b"):
            rows = pd.read_csv(tmp_path / "ev" / name / "results.csv")
            want = mean_pass_at_k(rows["num_samples"].tolist(), rows["num_correct"].tolist(), k)
            assert float(table[(table.model == name) & (table.k == k)]["pass@k"].iloc[0]) == pytest.approx(want)
        b = table[(table.model == "b") & (table.k == k)].iloc[0]
        assert b["diff"] == 0.0 and b["ci95_low"] == 0.0 and b["ci95_high"] == 0.0
    assert "| held | b | 1 |" in proc.stdout and (tmp_path / "ev" / "compare_held.png").is_file()


def _config_with_a_set(tmp_path, model_dir):
    """A config whose training run evaluates its held-out rows and one more set, `keep`."""
    train, keep = tmp_path / "train.jsonl", tmp_path / "keep.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                         "task": "reward_fns:has_digit"}) + "\n" for i in range(8)))
    keep.write_text("".join(json.dumps({"prompt": f"Q: {i}-1=?\nA:", "answer": str(i - 1),
                                        "task": "reward_fns:has_digit"}) + "\n" for i in range(5)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {model_dir}}}\ndata: {{task: jsonl, train_path: {train}, eval_fraction: 0.25}}\n"
                      "eval: {samples: 4, ks: [1, 2], sets: [{name: keep, path: " + str(keep) + ", samples: 3, "
                      "ks: [1, 3], retention: true}]}\nrollout: {max_new_tokens: 6}\n")
    return config


def test_eval_without_data_takes_the_configs_sets(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from grpo_ray import cli
    from grpo_ray.driver import evaluation

    config, seen = _config_with_a_set(tmp_path, tiny_model_dir), []

    def fake(cfg, model, sets, outs, log=print):
        seen.append((model, [(s.name, len(s.records), s.samples, s.ks) for s in sets], outs))
        return [({}, [{"prompt": r["prompt"], "num_samples": s.samples, "num_correct": 1} for r in s.records])
                for s in sets]

    monkeypatch.setattr(evaluation, "eval_model_sets", fake)
    out = tmp_path / "o"
    cli.main(["eval", "--model", f"a={tiny_model_dir}", "--config", str(config), "--model", f"b={tiny_model_dir}",
              "--out", str(out), "eval.num_prompts=2"])
    # the held-out set: the 2 rows held out of 8; keep: eval.num_prompts=2 of its 5, its own samples and ks
    want = [("", 2, 4, [1, 2]), ("keep", 2, 3, [1, 3])]
    assert seen == [(tiny_model_dir, want, [str(out / m / "held-out"), str(out / m / "keep")]) for m in ("a", "b")]
    table = open(out / "compare.md").read()
    assert "| held-out | b | 2 |" in table and "| keep | b | 3 |" in table
    assert {"compare_held-out.png", "compare_keep.png"} <= set(os.listdir(out))
    for argv, said in ((["--model", f"a={tiny_model_dir}", "eval.samples=4"], "give DATA"),  # nothing to evaluate
                       (["--model", f"a={tiny_model_dir}", "--config", str(config), "--train-data", "t.jsonl"],
                        "--train-data apply to DATA"),  # DATA's options without DATA: said, not ignored
                       ([tiny_model_dir, "--model", f"a={tiny_model_dir}", "d.jsonl"], "(not both)")):
        with pytest.raises(SystemExit):
            cli.main(["eval", *argv])
        assert said in capsys.readouterr().err


@pytest.mark.slow
def test_eval_compares_models_over_a_configs_sets(tiny_model_dir, tmp_path):
    """grpo-ray eval --config without DATA, for real: every set of the config for each model, one
    table with a block per set, equal to the estimator over each set's CSV."""
    import pandas as pd

    config = _config_with_a_set(tmp_path, tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "eval", "--model", f"a={tiny_model_dir}", "--model",
                           f"b={tiny_model_dir}", "--config", str(config), "--out", str(tmp_path / "ev")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "ev" / "compare.csv")
    assert sorted(set(zip(table["set"], table["k"]))) == [("held-out", 1), ("held-out", 2), ("keep", 1), ("keep", 3)]
    for (set_name, k), rows in table.groupby(["set", "k"]):
        for name in ("a", "b"):
            got = pd.read_csv(tmp_path / "ev" / name / set_name / "results.csv")
            want = mean_pass_at_k(got["num_samples"].tolist(), got["num_correct"].tolist(), k)
            assert float(rows[rows.model == name]["pass@k"].iloc[0]) == pytest.approx(want)
        assert float(rows[rows.model == "b"]["diff"].iloc[0]) == 0.0  # the same model, the same seeds
    assert (tmp_path / "ev" / "a" / "keep" / "results.csv").is_file()
    assert len(pd.read_csv(tmp_path / "ev" / "a" / "keep" / "results.csv")) == 5


@pytest.mark.slow
def test_eval_runs_the_configs_environment(tiny_model_dir, tmp_path):
    """Issue 23: `grpo-ray eval` samples multi-turn trajectories when the config names an
    environment, as training does: a user env that answers twice before it ends gives every
    trajectory 2 tool calls, in pass_at_k.json."""
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:has_digit"}) + "\n" for i in range(4)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "eval", tiny_model_dir, str(data), "--k", "1,2",
                           "--samples", "2", "--max-new-tokens", "48", "--out", str(tmp_path / "ev"),
                           "env.name=env_fns:Echo", "env.options={turns: 3}", "env.turn_tokens=4"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "pass_at_k.json").read_text())
    assert metrics["eval/tool_calls/mean"] == 2.0 and metrics["problems"] == 4
