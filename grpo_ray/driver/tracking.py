"""Where metrics go: metrics.jsonl always (the source of truth, append-only), TensorBoard event
files under run_dir/tensorboard (run.tensorboard), and Weights & Biases when it is installed and
run.wandb_project is set. A sink that fails to start is reported once and skipped: logging never stops a
training run."""
from __future__ import annotations

import math
import os
import sys

from ..core.metrics import MetricsLog


class Tracker:
    def __init__(self, run_dir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str = "", config: dict | None = None, resumed: bool = False):
        self.jsonl = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as e:
                print(f"grpo-ray: TensorBoard logging off ({e}); pip install tensorboard", file=sys.stderr)
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=run_dir,
                                        resume="allow" if resumed else None)
                # charts against our step, not W&B's own counter: W&B drops a log whose step is
                # below its counter, and a KL rollback re-runs steps (metrics.jsonl keeps both)
                self.wandb.define_metric("train/step")
                self.wandb.define_metric("*", step_metric="train/step")
            except Exception as e:  # not installed, offline, no API key: say so and go on
                print(f"grpo-ray: Weights & Biases logging off ({type(e).__name__}: {e})", file=sys.stderr)

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        step = record.get("step")
        if step is None:
            return
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(float(v))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if "event" in record:
                self.tb.add_text(f"events/{record['event']}", str(record.get("message", "")), step)
        if self.wandb is not None and scalars:
            self.wandb.log({**scalars, "train/step": step})

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
