"""Tests for grpo_ray/data/datasets.py (JSONL loading, dataset split, PromptSampler) and grpo_ray/data/tasks.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grpo_ray.config import DataConfig
from grpo_ray.data.datasets import DataError, PromptSampler, load_datasets, load_jsonl
from grpo_ray.data.tasks import (arithmetic_prompt, arithmetic_records, arithmetic_response, arithmetic_work,
                            tokenizer_corpus)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


def write_jsonl(tmp_path: Path, lines: list, name: str = "d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(p)


# --------------------------------------------------------------------------- load_jsonl


def test_load_jsonl_good_file(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "1+1?", "answer": "2"},
        "",  # blank lines are skipped
        {"prompt": "2+2?", "answer": 4, "extra": "kept"},
        {"prompt": "q", "answer": "a", "task": "reward_fns:digit_fraction"},
    ])
    recs = load_jsonl(path)
    assert len(recs) == 3
    assert recs[0] == {"prompt": "1+1?", "raw_prompt": "1+1?", "answer": "2", "task": "math"}
    assert recs[1]["answer"] == 4  # answer kept as given
    assert recs[1]["extra"] == "kept"
    assert recs[1]["task"] == "math"
    assert recs[2]["task"] == "reward_fns:digit_fraction"  # an explicit task is not overwritten


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "answer": "a", "task": "mth"}, "task 'mth': expected math, code, or module:function"),
    ({"prompt": "q", "answer": "a", "task": "nomod:fn"}, "task 'nomod:fn': ModuleNotFoundError"),
    ({"prompt": "q", "answer": "a", "task": "reward_fns:no_such_fn"}, "task 'reward_fns:no_such_fn': AttributeError"),
    ({"prompt": "q", "answer": "a", "task": "code", "test_list": ["assert f()"]}, "a code row needs a 'tests' field"),
])
def test_a_row_no_verifier_could_score_is_an_error_naming_the_line(tmp_path, row, needle):
    # else every completion of that row scores 0, and the run trains on nothing
    path = write_jsonl(tmp_path, [{"prompt": "1+1?", "answer": "2"}, row])
    with pytest.raises(DataError, match=f"d.jsonl:2: {re.escape(needle)}"):
        load_jsonl(path)


def test_a_line_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "1+1?", "answer": "2"}\n' * 3 + b'{"prompt": "\xff\xfe", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:4: not UTF-8 text"):
        load_jsonl(str(path))


def test_missing_answer_field_names_path_line_and_key(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
        {"prompt": "c", "solution": "3"},
    ])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert f"{path}:3" in msg
    assert "'answer'" in msg


def test_empty_answer_is_missing(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "a", "answer": ""}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*'answer'"):
        load_jsonl(path)


def test_code_rows_need_no_answer(tmp_path):
    """MBPP-style rows: prompt, tests (and entry_point); the tests score them, not an answer."""
    row = {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\n"}
    recs = load_jsonl(write_jsonl(tmp_path, [{**row, "task": "code"}]))
    assert recs[0]["answer"] is None and recs[0]["task"] == "code"
    assert load_jsonl(write_jsonl(tmp_path, [row], "c.jsonl"), verifier="code")[0]["task"] == "code"
    with pytest.raises(DataError, match="'answer'"):  # a math row still needs its answer
        load_jsonl(write_jsonl(tmp_path, [row], "m.jsonl"))


def test_missing_prompt_field(tmp_path):
    path = write_jsonl(tmp_path, [{"question": "a", "answer": "1"}])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert f"{path}:1" in str(e.value) and "'prompt'" in str(e.value)


def test_non_json_line_names_path_and_line(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "a", "answer": "1"}, "{not json", {"prompt": "b", "answer": "2"}])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert f"{path}:2" in str(e.value)
    assert "not valid JSON" in str(e.value)


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path, [[1, 2]])
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*expected a JSON object"):
        load_jsonl(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="cannot read dataset"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_jsonl(str(empty))


def test_key_remapping(tmp_path):
    path = write_jsonl(tmp_path, [{"question": "How many?", "target": "#### 7"}])
    recs = load_jsonl(path, prompt_key="question", answer_key="target")
    assert recs[0]["prompt"] == "How many?"
    assert recs[0]["answer"] == "#### 7"
    assert recs[0]["question"] == "How many?"  # original fields are kept
    # with the default keys the same file is an error naming the missing key
    with pytest.raises(DataError, match="'prompt'"):
        load_jsonl(path)


def test_gsm8k_loads_with_question_key():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    recs = load_jsonl(str(GSM8K_TEST), prompt_key="question", answer_key="answer")
    assert len(recs) == 1319
    assert all(r["prompt"] == r["question"] and r["task"] == "math" for r in recs)
    assert all("####" in r["answer"] for r in recs)
    assert recs[0]["prompt"].startswith("Janet")
    # GSM8K has no 'prompt' field: the default keys fail on the first row
    with pytest.raises(DataError, match=re.escape(f"{GSM8K_TEST}:1") + ".*'prompt'"):
        load_jsonl(str(GSM8K_TEST))


def test_prompt_template_and_default_verifier(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "What is {x}?", "answer": "2", "tests": "assert True"},
                                  {"prompt": "p", "answer": "a", "task": "math"}])
    recs = load_jsonl(path, template="Q: {prompt}\nPut the answer in \\boxed{}.", verifier="code")
    # braces in the prompt and the template stay as written (no str.format)
    assert recs[0]["prompt"] == "Q: What is {x}?\nPut the answer in \\boxed{}."
    assert recs[0]["raw_prompt"] == "What is {x}?"
    assert [r["task"] for r in recs] == ["code", "math"]  # a row's own task wins
    cfg = DataConfig(task="jsonl", train_path=path, eval_path=path, prompt_template="[{prompt}]", verifier="code")
    train, held_out = load_datasets(cfg, seed=0)
    assert train[0]["prompt"] == held_out[0]["prompt"] == "[What is {x}?]" and train[0]["task"] == "code"


def test_prompt_template_without_placeholder_is_a_config_error():
    from grpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.prompt_template='Solve it' has no \{prompt\}"):
        load_config(None, ["data.prompt_template=Solve it"])


def test_humaneval_rows_from_the_cli_score_their_canonical_solutions(tmp_path):
    """`grpo-ray data humaneval` writes the 164 problems as code rows; under a prompt template
    the verifier still completes the problem's own code (raw_prompt), not the templated text."""
    from grpo_ray.cli import main
    from grpo_ray.verifiers import verify

    out = tmp_path / "he.jsonl"
    main(["data", "humaneval", str(out)])
    recs = load_jsonl(str(out), template="Complete this function:\n{prompt}")
    assert len(recs) == 164 and {r["task"] for r in recs} == {"code"}
    assert recs[0]["prompt"].startswith("Complete this function:\nfrom typing import List")
    for rec in recs[:3]:
        assert verify(rec, rec["answer"]).reward == 1.0, rec["id"]
        assert verify(rec, "    return None\n").reward == 0.0


# --------------------------------------------------------------------------- load_datasets


def test_load_datasets_jsonl_split(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)])
    cfg = DataConfig(task="jsonl", train_path=path, eval_fraction=0.25)
    train, held = load_datasets(cfg, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    assert {r["prompt"] for r in train + held} == {f"p{i}" for i in range(20)}
    # deterministic for a seed
    train2, held2 = load_datasets(cfg, seed=3)
    assert train2 == train and held2 == held


def test_load_datasets_jsonl_with_eval_path(tmp_path):
    tr = write_jsonl(tmp_path, [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}], "train.jsonl")
    ev = write_jsonl(tmp_path, [{"q": "c", "a": "3"}], "eval.jsonl")
    cfg = DataConfig(task="jsonl", train_path=tr, eval_path=ev, prompt_key="q", answer_key="a")
    train, held = load_datasets(cfg, seed=0)
    assert [r["prompt"] for r in train] == ["a", "b"]
    assert [r["prompt"] for r in held] == ["c"]


def test_load_datasets_arithmetic():
    cfg = DataConfig(task="arithmetic", max_operand=9, eval_fraction=0.1)
    train, held = load_datasets(cfg, seed=1)
    assert (train, held) == arithmetic_records(9, 1, 0.1)


# --------------------------------------------------------------------------- tasks


_PROMPT = re.compile(r"^Q: (\d+)\+(\d+)=\?\nA:$")


@pytest.mark.parametrize("max_operand,frac", [(9, 0.1), (49, 0.1), (5, 0.5)])
def test_arithmetic_split(max_operand, frac):
    train, held = arithmetic_records(max_operand, seed=0, eval_fraction=frac)
    n = (max_operand + 1) ** 2
    assert len(train) + len(held) == n
    assert len(held) == max(1, int(n * frac))
    train_prompts = {r["prompt"] for r in train}
    held_prompts = {r["prompt"] for r in held}
    assert len(train_prompts) == len(train) and len(held_prompts) == len(held)
    assert train_prompts.isdisjoint(held_prompts)
    pairs = set()
    for r in train + held:
        m = _PROMPT.match(r["prompt"])
        assert m, r["prompt"]
        a, b = int(m.group(1)), int(m.group(2))
        assert r["answer"] == str(a + b)
        assert r["task"] == "math"
        pairs.add((a, b))
    assert pairs == {(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)}


def test_arithmetic_split_deterministic_and_seeded():
    assert arithmetic_records(20, 7, 0.1) == arithmetic_records(20, 7, 0.1)
    assert arithmetic_records(20, 7, 0.1)[1] != arithmetic_records(20, 8, 0.1)[1]


def test_arithmetic_prompt_and_response_shape():
    assert arithmetic_prompt(3, 4) == "Q: 3+4=?\nA:"
    assert arithmetic_response(7) == " #### 7"  # hasty
    assert arithmetic_response(7, arithmetic_work({"a": 3, "b": 4})) == " 3+4=7 #### 7"  # careful
    corpus = tokenizer_corpus(9)
    assert arithmetic_prompt(0, 0) + arithmetic_response(0, "0+0=0") in corpus
    assert any("####" in line for line in corpus)


def test_arithmetic_answers_verify_with_math_verifier():
    from grpo_ray.verifiers import verify
    train, _ = arithmetic_records(9, 0, 0.1)
    for r in train[:20]:
        assert verify(r, arithmetic_response(int(r["answer"]))).reward == 1.0
        assert verify(r, arithmetic_response(int(r["answer"]) + 1)).reward == 0.0


# --------------------------------------------------------------------------- PromptSampler


def _records(n):
    return [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)]


def _prompts(batch):
    return [r["prompt"] for r in batch]


def test_sampler_deterministic_for_seed():
    recs = _records(10)
    a, b = PromptSampler(recs, seed=5), PromptSampler(recs, seed=5)
    assert _prompts(a.next(25)) == _prompts(b.next(25))
    c = PromptSampler(recs, seed=6)
    assert _prompts(PromptSampler(recs, seed=5).next(10)) != _prompts(c.next(10))


def test_sampler_epochs_are_permutations():
    recs = _records(7)
    s = PromptSampler(recs, seed=1)
    drawn = _prompts(s.next(7 * 4))
    epochs = [drawn[i * 7:(i + 1) * 7] for i in range(4)]
    for ep in epochs:
        assert sorted(ep) == sorted(r["prompt"] for r in recs)
    assert len({tuple(ep) for ep in epochs}) > 1  # reshuffled between epochs
    assert s.state_dict() == {"epoch": 3, "position": 7}


def test_sampler_batches_cross_epoch_boundary():
    recs = _records(5)
    s = PromptSampler(recs, seed=2)
    first = _prompts(s.next(3))
    second = _prompts(s.next(3))  # 2 from epoch 0, 1 from epoch 1
    assert sorted(first + second[:2]) == sorted(r["prompt"] for r in recs)
    assert s.state_dict() == {"epoch": 1, "position": 1}


@pytest.mark.parametrize("done", [0, 1, 2, 3, 5, 7])
def test_sampler_resume_matches_uninterrupted(done):
    """Interrupt after `done` batches of 3 from 7 records (mid-epoch and at epoch boundaries)."""
    recs = _records(7)
    full = PromptSampler(recs, seed=11)
    reference = [_prompts(full.next(3)) for _ in range(8)]

    s = PromptSampler(recs, seed=11)
    got = [_prompts(s.next(3)) for _ in range(done)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(recs, seed=11)
    resumed.next(2)  # a fresh sampler that already drew something is overwritten by the state
    resumed.load_state_dict(state)
    got += [_prompts(resumed.next(3)) for _ in range(8 - done)]
    assert got == reference


def test_sampler_returns_record_objects():
    recs = _records(3)
    s = PromptSampler(recs, seed=0)
    out = s.next(3)
    assert all(any(o is r for r in recs) for o in out)


# --------------------------------------------------------------------------- wrong types (issue 28 #8)


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "answer": ["2", "3"]}, "'answer' must be a string or a number, got list"),
    ({"prompt": "q", "answer": {"v": 2}}, "'answer' must be a string or a number, got dict"),
    ({"prompt": "q", "answer": True}, "'answer' must be a string or a number, got bool"),
    ({"prompt": ["q", "r"], "answer": "2"}, "'prompt' must be a string, got list"),
    ({"prompt": {"text": "q"}, "answer": "2"}, "'prompt' must be a string, got dict"),
    ({"prompt": 7, "answer": "2"}, "'prompt' must be a string, got int"),
])
def test_a_prompt_or_answer_of_the_wrong_type_is_an_error_naming_the_line(tmp_path, row, needle):
    # a list answer was accepted silently: the row could never be scored right (pass@1 capped)
    path = write_jsonl(tmp_path, [{"prompt": "1+1?", "answer": "2"}, row])
    with pytest.raises(DataError, match=f"d.jsonl:2: {re.escape(needle)}"):
        load_jsonl(path)


def test_a_remapped_key_of_the_wrong_type_names_that_key(tmp_path):
    path = write_jsonl(tmp_path, [{"question": "q", "target": [1]}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: 'target' must be a string or a number, got list")):
        load_jsonl(path, prompt_key="question", answer_key="target")


def test_numeric_answers_still_load(tmp_path):
    recs = load_jsonl(write_jsonl(tmp_path, [{"prompt": "a", "answer": 4}, {"prompt": "b", "answer": 2.5}]))
    assert [r["answer"] for r in recs] == [4, 2.5]


# --------------------------------------------------------------------------- prompt lengths (issue 28 #2)


def _tokenizer(model_dir):
    from grpo_ray.models.modeling import load_tokenizer

    return load_tokenizer(model_dir)


def test_records_know_their_file_and_line(tmp_path):
    from grpo_ray.data.datasets import source_of

    path = write_jsonl(tmp_path, [{"prompt": "a", "answer": "1"}, "", {"prompt": "b", "answer": "2"}])
    recs = load_jsonl(path)
    assert [source_of(r) for r in recs] == [f"{path}:1", f"{path}:3"]


def test_a_prompt_too_long_for_the_model_is_an_error_naming_file_and_line(tmp_path, tiny_model_dir):
    from grpo_ray.data.datasets import fit_prompts

    tok = _tokenizer(tiny_model_dir)
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(5)]
    rows[3]["prompt"] = "1 + 1 " * 20  # 120 characters, about 120 tokens: more than 48
    path = write_jsonl(tmp_path, rows)
    recs = load_jsonl(path)
    with pytest.raises(DataError, match=re.escape(f"{path}:4: the prompt needs ") + r"\d+ tokens.*48"):
        fit_prompts(recs, tok, limit=48)
    assert fit_prompts(recs[:3], tok, limit=48) == (recs[:3], 0)  # the short ones fit: nothing dropped
    kept, dropped = fit_prompts(recs, tok, limit=48, drop=True)
    assert dropped == 1 and kept == recs[:3] + recs[4:]


def test_a_huge_prompt_is_refused_without_tokenising_it(tmp_path):
    from grpo_ray.data.datasets import fit_prompts

    class Counting:
        def __init__(self):
            self.chars = 0

        def __call__(self, texts, **kw):
            self.chars += sum(len(t) for t in texts)
            return {"input_ids": [[0] * len(t) for t in texts]}

    path = write_jsonl(tmp_path, [{"prompt": "a", "answer": "1"}, {"prompt": "x" * 5_000_000, "answer": "2"}])
    tok = Counting()
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the prompt") + ".*5000000 characters"):
        fit_prompts(load_jsonl(path), tok, limit=48)
    assert tok.chars < 1000


def test_train_refuses_a_long_prompt_before_any_actor_starts(tmp_path, tiny_model_dir, monkeypatch):
    from grpo_ray.config import load_config
    from grpo_ray.driver import train as train_mod

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the prompt lengths were checked")

    monkeypatch.setattr(train_mod, "init_ray", no_ray)
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(8)]
    rows[5]["prompt"] = "1 + 1 " * 200
    path = write_jsonl(tmp_path, rows)
    overrides = [f"model.path={tiny_model_dir}", "data.task=jsonl", f"data.train_path={path}",
                 f"run.output_dir={tmp_path}", "run.name=r", "rollout.max_model_len=64", "rollout.max_new_tokens=16"]
    with pytest.raises(DataError, match=re.escape(f"{path}:6: the prompt needs")):
        train_mod.train(load_config(None, overrides))
    cfg = load_config(None, overrides + ["data.drop_long_prompts=true"])
    with pytest.raises(AssertionError, match="Ray started"):  # dropped with a count: the run goes on
        train_mod.train(cfg)


def test_an_eval_file_with_a_long_prompt_is_refused_before_sampling(tmp_path, tiny_model_dir, monkeypatch):
    from grpo_ray.config import load_config
    from grpo_ray.driver import evaluation

    import grpo_ray.roles.actors as actors

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the prompt lengths were checked")

    monkeypatch.setattr(actors, "init_ray", no_ray)
    path = write_jsonl(tmp_path, [{"prompt": "1+1?", "answer": "2"}, {"prompt": "1 + 1 " * 200, "answer": "2"}])
    cfg = load_config(None, ["rollout.max_model_len=64", "rollout.max_new_tokens=16"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the prompt needs")):
        evaluation.eval_model(cfg, tiny_model_dir, load_jsonl(path), str(tmp_path / "out"))


def test_records_reach_other_processes_as_plain_dicts(tmp_path):
    """The file:line a record carries is for the driver's errors only: pickled (to the verifier
    pool, a user reward function's worker) it is the row's fields, a plain dict."""
    import pickle

    rec = load_jsonl(write_jsonl(tmp_path, [{"prompt": "a", "answer": "1", "id": 7}]))[0]
    sent = pickle.loads(pickle.dumps(rec, pickle.HIGHEST_PROTOCOL))
    assert type(sent) is dict and sent == {"prompt": "a", "raw_prompt": "a", "answer": "1", "task": "math", "id": 7}
    assert b"grpo_ray" not in pickle.dumps(rec, pickle.HIGHEST_PROTOCOL)


def test_the_warm_started_base_is_cached_for_every_output_dir(tmp_path, monkeypatch):
    """Issue 27: the builtin:tiny base was cached beside the run directories, so each run with
    another run.output_dir (each `ray job submit`, each benchmark) redid the warm start. It is
    kept in the user's cache (GRPO_RAY_CACHE_DIR, XDG_CACHE_HOME/grpo-ray or ~/.cache/grpo-ray)."""
    from grpo_ray.config import load_config
    from grpo_ray.data.datasets import load_datasets
    from grpo_ray.driver.outputs import prepare_model, resolve_run_dir
    from grpo_ray.models.cache import cache_dir

    monkeypatch.setenv("GRPO_RAY_CACHE_DIR", str(tmp_path / "cache"))
    logs, paths = [], []
    for out in ("a", "b"):
        cfg = load_config(None, [f"run.output_dir={tmp_path / out}", "warmstart.steps=2"])
        records = load_datasets(cfg.data, cfg.run.seed)[0]
        paths.append(prepare_model(cfg, records, resolve_run_dir(cfg), logs.append))
    assert paths[0] == paths[1] and paths[0].startswith(str(tmp_path / "cache"))
    assert logs[-1].endswith("(cached)") and not any(m.endswith("(cached)") for m in logs[:-1])
    assert not (tmp_path / "a" / ".cache").exists()
    monkeypatch.delenv("GRPO_RAY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "grpo-ray")

