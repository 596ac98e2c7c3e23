"""Prompt datasets: the built-in arithmetic task or JSONL files (GSM8K-style), and the
deterministic, resumable order in which training prompts are drawn."""
from __future__ import annotations

import json
import random

from .tasks import arithmetic_records


class DataError(ValueError):
    pass


def load_jsonl(path: str, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    """Rows become {"prompt", "answer", "task", ...the rest}. A malformed line or a row without
    its prompt/answer field is an error naming the file and the line; nothing is skipped silently."""
    records = []
    try:
        f = open(path)
    except OSError as e:
        raise DataError(f"cannot read dataset {path!r}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in (prompt_key, answer_key):
                if key not in row or row[key] in (None, ""):
                    raise DataError(f"{path}:{lineno}: row has no '{key}' field "
                                    f"(set data.prompt_key / data.answer_key to the dataset's field names)")
            rec = dict(row)
            rec["prompt"], rec["answer"] = str(row[prompt_key]), row[answer_key]
            rec.setdefault("task", "math")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no rows")
    return records


def load_datasets(data_cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out) records for the configured task."""
    if data_cfg.task == "arithmetic":
        return arithmetic_records(data_cfg.max_operand, seed, data_cfg.eval_fraction)
    train = load_jsonl(data_cfg.train_path, data_cfg.prompt_key, data_cfg.answer_key)
    if data_cfg.eval_path:
        return train, load_jsonl(data_cfg.eval_path, data_cfg.prompt_key, data_cfg.answer_key)
    if len(train) < 2:
        raise DataError(f"{data_cfg.train_path}: {len(train)} row(s); need at least 2 to hold some out for "
                        "evaluation, or set data.eval_path")
    n_eval = max(1, int(len(train) * data_cfg.eval_fraction))
    shuffled = train[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


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
