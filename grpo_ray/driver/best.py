"""train.keep_best: the best checkpoint by an evaluation metric, kept beside the newest ones
(checkpoint.prune never deletes it) and copied to best_model/ at the end (OpenRLHF keeps its best
checkpoint the same way). Only evaluations after a training step compete: the base has no
checkpoint to keep."""
from __future__ import annotations

import os
import shutil

from .checkpoint import checkpoint_path, writing


class Best:
    def __init__(self, metric: str):
        self.metric, self.value, self.step = metric, None, None

    def offer(self, step: int, metrics: dict) -> bool:
        """Whether the evaluation of `step` is the best so far (higher is better)."""
        value = metrics.get(self.metric)
        if step < 1 or value is None or (self.value is not None and value <= self.value):
            return False
        self.value, self.step = float(value), step
        return True

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict | None) -> None:
        """From a checkpoint (resume, rollback); a checkpoint of another metric starts over."""
        state = state if state and state.get("metric") == self.metric else {}
        self.value, self.step = state.get("value"), state.get("step")


def write_best_model(run_dir: str, best: Best) -> str:
    """best_model/: the best checkpoint's policy (a Hugging Face folder), written atomically."""
    out = os.path.join(run_dir, "best_model")
    with writing(out) as tmp:
        os.rmdir(tmp)  # copytree makes it
        shutil.copytree(os.path.join(checkpoint_path(run_dir, best.step), "policy"), tmp)
    return out
