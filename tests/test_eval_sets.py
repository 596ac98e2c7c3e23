"""eval.sets and retention (issue 25): more evaluation sets beside the held-out one, each under
its own keys, and the warning when a set marked retention falls below where it started."""
from __future__ import annotations

import html
import json
import os
import re

import pytest

from grpo_ray.config import ConfigError, load_config
from grpo_ray.data.datasets import DataError
from grpo_ray.data.tasks import arithmetic_response, arithmetic_work
from grpo_ray.driver.evaluation import EvalSet, Retention


def _set(name, retention=True, ks=(1, 4)):
    return EvalSet(name, [], 4, list(ks), 1.0, retention)


def test_retention_warns_below_the_first_value_and_says_the_verdict():
    r = Retention([_set(""), _set("keep"), _set("other", retention=False)], drop=0.05)
    assert r.keys == {"held-out": "eval/pass@1", "keep": "eval/keep/pass@1"}
    assert r.check({"eval/pass@1": 0.5, "eval/keep/pass@1": 0.6, "eval/other/pass@1": 0.9}, 0) == []  # baselines
    assert r.check({"eval/pass@1": 0.46, "eval/keep/pass@1": 0.56}, 5) == []  # within the drop
    assert r.held_at == 5
    said = r.check({"eval/pass@1": 0.7, "eval/keep/pass@1": 0.5}, 10)
    assert len(said) == 1 and said[0].startswith("retention: eval set 'keep' fell from 0.600 to 0.500")
    assert "raise algo.beta" in said[0] and "eval.retention_drop=0.05" in said[0]
    assert r.held_at == 5  # the newest evaluation at which every set held: a rollback goes back no later
    assert r.verdict({"eval/pass@1": 0.7, "eval/keep/pass@1": 0.5}) == \
        "retention: held-out held (0.500 -> 0.700); keep LOST (0.600 -> 0.500)"
    again = Retention([_set("keep")], drop=0.05)
    again.load_state_dict(r.state_dict())  # a resume keeps the baselines of the first session
    assert again.held_at == 5 and again.check({"eval/keep/pass@1": 0.5}, 15)
    old = Retention([_set("keep")], drop=0.05)
    old.load_state_dict({"keep": 0.6})  # a checkpoint written before held_at existed: its baselines
    assert old.start == {"keep": 0.6} and old.held_at is None


def test_retention_rollback_goes_back_no_later_than_the_last_evaluation_that_held(tmp_path):
    from grpo_ray.driver.checkpoint import checkpoint_path, newest_good, prune, write_state

    run = str(tmp_path)
    for step, stopped in ((2, False), (4, False), (5, False), (6, True)):
        os.makedirs(checkpoint_path(run, step))
        write_state(checkpoint_path(run, step), step, {"kl_stopped": stopped})
    assert newest_good(run)[0] == 5 and newest_good(run, at_most=4)[0] == 4 and newest_good(run, at_most=1) is None
    prune(run, keep=1, protect=(2,))  # the newest, the newest KL-good, and the protected one
    assert [s for s in (2, 4, 5, 6) if os.path.isdir(checkpoint_path(run, s))] == [2, 5, 6]


def test_retention_actions_need_a_retention_set_and_checkpoints():
    keep = "eval.sets=[{name: keep, path: keep.jsonl, retention: true}]"
    with pytest.raises(ConfigError, match=re.escape("eval.retention_action=stop acts when a retention set falls, "
                                                    "but no set in eval.sets is marked retention: true")):
        load_config(None, ["eval.retention_action=stop", "eval.sets=[{name: keep, path: keep.jsonl}]"])
    with pytest.raises(ConfigError, match="train.checkpoint_every=0 saves none"):
        load_config(None, ["eval.retention_action=rollback", keep, "train.checkpoint_every=0"])
    with pytest.raises(ConfigError, match="train.eval_every=0 evaluates at the start and the end alone"):
        load_config(None, ["eval.retention_action=rollback", keep, "train.eval_every=0"])
    assert load_config(None, ["eval.retention_action=rollback", keep]).eval.retention_action == "rollback"
    with pytest.raises(ConfigError, match="name='held-out' is the main held-out set's"):
        load_config(None, ["eval.sets=[{name: held-out, path: keep.jsonl}]"])


def test_a_rollback_discards_the_abandoned_steps_checkpoints_and_reference_resets(tmp_path):
    """Left on disk, the abandoned run's checkpoints would fill pruning's slots (the rerun's own
    deleted as soon as saved) and be what a resume or a later rollback picks."""
    from grpo_ray.driver.checkpoint import REFERENCES, checkpoint_path, discard_after, list_checkpoints, write_state

    run = str(tmp_path)
    for step in (3, 4, 5, 7):
        os.makedirs(checkpoint_path(run, step))
        write_state(checkpoint_path(run, step), step, {})
    for step in (2, 5):
        os.makedirs(os.path.join(run, REFERENCES, f"step_{step:06d}"))
    discard_after(run, 4)
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    assert sorted(os.listdir(os.path.join(run, REFERENCES))) == ["step_000002"]


def test_eval_sets_bad_input_is_named_before_any_actor(tmp_path, tiny_model_dir, monkeypatch):
    from grpo_ray.driver import train as train_mod

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the eval sets were read")

    monkeypatch.setattr(train_mod, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=re.escape("eval.sets: the name(s) ['a'] are given twice")):
        load_config(None, ["eval.sets=[{name: a, path: x.jsonl}, {name: a, path: y.jsonl}]"])
    with pytest.raises(ConfigError, match="train.keep_best='eval/b/pass@1': no evaluation logs it"):
        load_config(None, ["eval.sets=[{name: a, path: x.jsonl}]", "train.keep_best=eval/b/pass@1"])
    assert load_config(None, ["eval.sets=[{name: a, path: x.jsonl}]", "train.keep_best=eval/a/pass@1"])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    base = [f"model.path={tiny_model_dir}", "data.task=jsonl", f"data.train_path={data}", f"run.output_dir={tmp_path}",
            "run.name=r"]
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        train_mod.train(load_config(None, base + [f"eval.sets=[{{name: keep, path: {missing}}}]"]))
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_set_loses_its_training_prompts_and_takes_its_own_sizes(tmp_path):
    from grpo_ray.driver.evaluation import eval_sets

    f = tmp_path / "keep.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}-1?", "answer": str(i - 1)}) + "\n" for i in range(10)))
    cfg = load_config(None, [f"eval.sets=[{{name: keep, path: {f}, num_prompts: 5, samples: 8, ks: [1, 8], "
                             "retention: true}]", "eval.num_prompts=3"])
    sets = eval_sets(cfg, [{"prompt": "h"}] * 6, [{"prompt": "0-1?"}], lambda rows, name: rows)
    main, keep = sets
    assert (main.name, len(main.records), main.samples, main.ks) == ("", 3, 16, [1, 10])
    assert (keep.name, keep.samples, keep.ks, keep.retention) == ("keep", 8, [1, 8], True)
    assert [r["prompt"] for r in keep.records] == [f"{i}-1?" for i in range(1, 6)]  # 0-1? trains: dropped
    assert keep.key("pass@8") == "eval/keep/pass@8" and main.key("pass@1") == "eval/pass@1"


@pytest.mark.slow
def test_the_loop_evaluates_every_set_and_watches_retention(ray_local, tiny_model_dir, tmp_path, capsys):
    from grpo_ray.driver.train import train

    train_file, keep = tmp_path / "train.jsonl", tmp_path / "keep.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                              "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    keep.write_text("".join(json.dumps({"prompt": f"Q: {i}-1=?\nA:", "answer": str(i - 1),
                                        "task": "reward_fns:has_digit"}) + "\n" for i in range(6)))
    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=3", "train.eval_every=1",
        "eval.num_prompts=4", "eval.samples=4", "eval.ks=[1,4]", "learner.lr=1e-2", "learner.micro_batch_size=8",
        "run.tensorboard=false", f"run.output_dir={tmp_path}", "run.name=sets", f"model.path={tiny_model_dir}",
        "data.task=jsonl", f"data.train_path={train_file}", "data.eval_fraction=0.25",
        f"eval.sets=[{{name: keep, path: {keep}, samples: 6, ks: [1, 2], retention: true}}]", "eval.retention_drop=0.0"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert all({"eval/keep/pass@1", "eval/keep/pass@2", "eval/keep/mean_reward"} <= set(r) for r in evals)
    start = evals[0]["eval/keep/pass@1"]
    fell = [r["step"] for r in evals if r["eval/keep/pass@1"] < start]
    events = [r["step"] for r in rows if r.get("event") == "retention"]
    assert events == fell  # a warning exactly at the evaluations below the start (drop 0)
    assert os.path.isfile(os.path.join(run_dir, "plots", "pass_at_k_keep.png"))
    # each step's console line ends with the newest evaluation's pass@ of every set (step 2's: step 1's)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 2/3 |")]
    assert lines and lines[0].endswith(f"| pass@1 {evals[1]['eval/pass@1']:.3f} | keep/pass@1 "
                                       f"{evals[1]['eval/keep/pass@1']:.3f}"), lines
    # the run's report: every eval set's metrics, every chart, every warning, no external URL
    page = open(os.path.join(run_dir, "report.html")).read()
    assert all(k in page for r in evals for k in r if k.startswith("eval/"))
    assert "retention" in page and "<td>keep</td>" not in page
    charts = sorted(os.listdir(os.path.join(run_dir, "plots")))
    assert len(charts) >= 7 and all(f'alt="{c}"' in page for c in charts)
    assert page.count("data:image/png;base64,") == len(charts)
    for r in rows:
        if r.get("event") in ("warning", "retention"):
            assert html.escape(r["message"]) in page, r["message"]
    assert "http://" not in page and "https://" not in page and "src=\"data:" in page


def test_retention_action_stop_stops_with_a_checkpoint_of_that_step(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.driver.evaluation import RetentionStop
    from grpo_ray.driver.train import train

    train_file, keep, counter = tmp_path / "train.jsonl", tmp_path / "keep.jsonl", tmp_path / "calls"
    train_file.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                              "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    keep.write_text("".join(json.dumps({"prompt": f"Q: {i}-1=?\nA:", "answer": str(i - 1), "task": "reward_fns:fading",
                                        "counter": str(counter), "budget": 4 * 4}) + "\n" for i in range(4)))
    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=4", "train.eval_every=2",
        "eval.num_prompts=4", "eval.samples=4", "eval.ks=[1]", "learner.micro_batch_size=8", "run.tensorboard=false",
        f"run.output_dir={tmp_path}", "run.name=stop", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={train_file}", "data.eval_fraction=0.25", "train.checkpoint_every=0",
        f"eval.sets=[{{name: keep, path: {keep}, retention: true}}]", "eval.retention_action=stop"])
    with pytest.raises(RetentionStop) as e:
        train(cfg)
    assert "eval set 'keep' fell from 1.000 to 0.000" in str(e.value) and "checkpoint of step 2" in str(e.value)
    run_dir = tmp_path / "stop"
    assert (run_dir / "checkpoints" / "step_000002" / "state.json").is_file()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("event") == "retention"] == [2]
    assert max(r["step"] for r in rows if "reward/mean" in r) == 2  # no step after the stop


@pytest.mark.slow
def test_retention_action_rollback_goes_back_to_where_every_set_held(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.driver.train import train

    train_file, keep, counter = tmp_path / "train.jsonl", tmp_path / "keep.jsonl", tmp_path / "calls"
    train_file.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                              "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    # 16 calls per evaluation: held at steps 0 and 2, lost at step 4, back at the rerun of step 4
    keep.write_text("".join(json.dumps({"prompt": f"Q: {i}-1=?\nA:", "answer": str(i - 1), "task": "reward_fns:dip",
                                        "counter": str(counter), "budget": 32, "width": 16}) + "\n" for i in range(4)))
    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=4", "train.eval_every=2",
        "eval.num_prompts=4", "eval.samples=4", "eval.ks=[1]", "learner.micro_batch_size=8", "run.tensorboard=false",
        f"run.output_dir={tmp_path}", "run.name=back", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={train_file}", "data.eval_fraction=0.25", "train.checkpoint_every=1",
        "train.keep_checkpoints=1", f"eval.sets=[{{name: keep, path: {keep}, retention: true}}]",
        "eval.retention_action=rollback"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [(r["step"], r["eval/keep/pass@1"]) for r in rows if "eval/keep/pass@1" in r]
    # the last step's evaluation is the loop's (it may still roll back), and finish() does not repeat it
    assert evals == [(0, 1.0), (2, 1.0), (4, 0.0), (4, 1.0)]
    assert [r["step"] for r in rows if r.get("event") == "retention"] == [4]
    back = [r for r in rows if r.get("event") == "retention_rollback"]
    assert [(r["step"], r["to_step"]) for r in back] == [(4, 2)]  # step 3's checkpoint is newer than the last hold
    assert "retention guard: rolled back from step 4 to the checkpoint of step 2" in back[0]["message"]
    assert "(x0.5), rollback 1 of 2" in back[0]["message"]  # the KL guard's lr factor and budget
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 3, 4]
    # the rerun of step 3 samples from step 2's weights, prompts and seeds: the same rollout
    assert steps[4]["reward/mean"] == steps[2]["reward/mean"]
    assert os.path.isfile(os.path.join(run_dir, "final_model", "config.json"))


def test_built_in_sets_cost_no_tokenizer_before_the_actors_start(tiny_model_dir, tmp_path, monkeypatch):
    """Preflight loaded a tokenizer (transformers' import: ~3 s of start-up on 2 cores) for every
    eval set; the default job's subtraction set is built in, with short prompts: nothing to fit."""
    from grpo_ray.driver import train as train_mod

    loaded = []
    monkeypatch.setattr(train_mod, "load_tokenizer", lambda path: loaded.append(path) or None)
    base = [f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", "eval.num_prompts=4"]
    cfg = load_config("configs/default.yaml", base)
    prepared = train_mod.preflight(cfg, print)
    assert loaded == [] and [s.name for s in prepared.eval_sets] == ["", "subtraction"]
    assert all(r["prompt"].startswith("Q: ") and "-" in r["prompt"] for r in prepared.eval_sets[1].records)
    keep = tmp_path / "keep.jsonl"
    keep.write_text(json.dumps({"prompt": "Q: 9-1=?\nA:", "answer": "8"}) + "\n")
    monkeypatch.setattr(train_mod, "load_tokenizer", lambda path: loaded.append(path) or __import__(
        "grpo_ray.models.modeling", fromlist=["x"]).load_tokenizer(path))
    train_mod.preflight(load_config("configs/default.yaml", base + [f"eval.sets=[{{name: k, path: {keep}}}]"]), print)
    assert loaded == [tiny_model_dir]  # a file's rows are fitted to the model


# the default job's retention set: subtraction, taught by the warm start, evaluated as a set

def test_subtraction_records_split_by_pair_verify_and_show_their_work():
    """The retention skill of the default job (eval.sets task subtract, warmstart.subtract)."""
    from grpo_ray.data.tasks import subtract_records
    from grpo_ray.verifiers import verify

    train, held = subtract_records(9, 0, 0.2)
    assert len(train) + len(held) == 55 and len(held) == 11  # 0 <= b <= a <= 9
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert subtract_records(9, 0, 0.2) == (train, held) and subtract_records(9, 1, 0.2)[1] != held
    r = next(r for r in train if r["a"] == 7 and r["b"] == 3) if any(r["a"] == 7 and r["b"] == 3 for r in train) \
        else next(r for r in held if r["a"] == 7 and r["b"] == 3)
    assert (r["prompt"], r["answer"]) == ("Q: 7-3=?\nA:", "4")
    assert arithmetic_response(4, arithmetic_work(r)) == " 7-3=4 #### 4"
    assert all(int(r["answer"]) >= 0 and verify(r, arithmetic_response(int(r["answer"]))).reward == 1.0 for r in held)


def test_warmstart_subtract_changes_only_its_own_cache_key(tmp_path, monkeypatch):
    """warmstart.subtract=0 (the default) leaves the cache key as it was, so bases cached before
    it existed stay valid; any other share is another base. The eval set task subtract is the
    held-out side of the same split."""
    from grpo_ray.config import load_config
    from grpo_ray.data.tasks import subtract_records
    from grpo_ray.driver.evaluation import eval_sets
    from grpo_ray.models import warmstart

    monkeypatch.setattr(warmstart, "build_tiny_model", lambda path, *a, **k: __import__("os").makedirs(path))
    built = []
    monkeypatch.setattr(warmstart, "supervised_warm_start", lambda *a, **k: built.append(a[-1] if len(a) > 7 else
                                                                                          k.get("subtractions")))
    paths = [warmstart.builtin_model(load_config(None, extra), [], str(tmp_path)) for extra in
             ([], ["warmstart.subtract=0.0"], ["warmstart.subtract=0.25"])]
    assert paths[0] == paths[1] != paths[2]
    assert built[0] == [] and built[1] == subtract_records(49, 0, 0.1)[0]  # the second: cached
    with pytest.raises(Exception, match="needs a path .* or a task"):
        load_config(None, ["eval.sets=[{name: s, task: subtract, path: x.jsonl}]"])
    cfg = load_config(None, ["eval.sets=[{name: s, task: subtract, num_prompts: 5, retention: true}]"])
    sets = eval_sets(cfg, [{"prompt": "h"}], [], lambda rows, name: rows)
    assert sets[1].records == subtract_records(49, 0, 0.1)[1][:5] and sets[1].retention
