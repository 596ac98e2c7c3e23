"""`grpo-ray plot RUN_DIR`: PNG charts of a run from its metrics.jsonl (matplotlib, no display).

One figure per topic, so each can go into a report on its own: reward (mean and within-group
std with the guide's 0.3 / 2.0 lines), KL with the stop line, held-out pass@k, clip fractions,
response length (and truncation), and the time per phase. A step logged more than once (a KL
rollback re-runs steps) is drawn from its last occurrence.
"""
from __future__ import annotations

import json
import os
import sys

import pandas as pd

from ..data.datasets import DataError

PHASES = ("generate", "verify", "reference", "learner", "sync", "overhead")


class MetricsFileError(DataError):
    """metrics.jsonl has nothing to plot (yet)."""


def load_metrics(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, evaluation rows) of run_dir/metrics.jsonl, one row per step (both empty,
    with a `step` column, when the run has written none yet).

    A crash or a full disk mid-write leaves a partial line: at the end of the file it is skipped
    (a resumed run cuts it); before the last line (a run of an older version appended the next
    record to it) the record after the partial one is kept. Either way with a warning on stderr,
    naming the line: the charts of a long run are not lost to one broken record."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = []
    with open(path) as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            continue
        except ValueError:
            pass
        glued = _record_after_partial(line)
        if glued is not None:
            rows.append(glued)
            what = "kept the record appended to a partial one"
        elif lineno == len(lines) and not line.endswith("\n"):
            what = f"skipped a partial last line ({len(line)} characters), or a record being written now"
        else:
            what = f"skipped a line that is not valid JSON ({line[:40]!r}...)"
        print(f"grpo-ray: warning: {path}:{lineno}: {what} (a crash or a full disk mid-write?)", file=sys.stderr)
    df = pd.DataFrame(rows)
    if "step" not in df:
        df["step"] = pd.Series(dtype="int64")
    if "event" in df:
        df = df[df["event"].isna()]
    train = df[df["reward/mean"].notna()] if "reward/mean" in df else df.iloc[0:0]
    evals = df[df[[c for c in df if c.startswith("eval/")]].notna().any(axis=1)] if any(
        c.startswith("eval/") for c in df) else df.iloc[0:0]
    last = lambda d: d.drop_duplicates("step", keep="last").sort_values("step")  # noqa: E731
    return last(train), last(evals)


def _records_to_plot(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, evals = load_metrics(run_dir)
    if not len(train) and not len(evals):
        raise MetricsFileError(f"{os.path.join(run_dir, 'metrics.jsonl')} has no step records yet: nothing to plot "
                               "yet (a run adds one line per training step and evaluation)")
    return train, evals


def _record_after_partial(line: str) -> dict | None:
    """The whole record at the end of `line` when it follows a partial one, else None."""
    start = line.find("{", 1)
    while start > 0:
        try:
            record = json.loads(line[start:])
            if isinstance(record, dict) and "step" in record:  # not a dict inside the partial record
                return record
        except ValueError:
            pass
        start = line.find("{", start + 1)
    return None


def plot_run(run_dir: str, kl_stop: float | None = None) -> list[str]:
    """Write run_dir/plots/*.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = _records_to_plot(run_dir)
    if kl_stop is None:
        kl_stop = _config_value(run_dir, ("algo", "kl_stop"), 0.1)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def figure(name: str, title: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        draw(ax)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path + ".tmp.png", dpi=110)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)  # a reader never sees half a PNG
        written.append(path)

    def series(ax, df, cols, **kw):
        for c in cols:
            if c in df and df[c].notna().any():
                ax.plot(df["step"], df[c], marker=".", label=c, **kw)

    if len(train):
        def reward(ax):
            series(ax, train, ["reward/mean", "reward/std"])
            for y in (0.3, 2.0):
                ax.axhline(y, color="grey", ls=":", lw=1)

        def kl(ax):
            series(ax, train, ["kl"])
            if kl_stop is not None:  # algo.kl_stop=null: no guard
                ax.axhline(kl_stop, color="red", ls="--", lw=1, label=f"kl_stop {kl_stop:g}")

        figure("reward", "reward: mean and within-group std (guide: std 0.3-2.0)", reward)
        if "kl" in train:  # no reference ran (algo.beta=0, algo.kl_stop=null): nothing to draw
            figure("kl", "KL to the reference (k3, per token)", kl)
        figure("clip", "clip fractions", lambda ax: series(ax, train, ["clip/low", "clip/high"]))
        def length(ax):
            series(ax, train, ["response_length/mean", "response_length/max"])
            if "truncated/frac" in train:  # a share, on its own axis
                twin = ax.twinx()
                series(twin, train, ["truncated/frac"], color="tab:red", ls="--")
                twin.set_ylim(0, 1.05)
                twin.set_ylabel("truncated/frac")
                ax.plot([], [], color="tab:red", ls="--", marker=".", label="truncated/frac (right)")  # one legend

        figure("length", "response length (tokens) and truncation", length)
        figure("timings", "seconds per phase", lambda ax: series(ax, train, [f"time/{p}" for p in PHASES]))
    for name, title, keys in eval_series(evals):  # the held-out set, then each of eval.sets
        figure(name, title, lambda ax, keys=keys: series(ax, evals, keys))
    return written


def eval_series(evals) -> list[tuple[str, str, list[str]]]:
    """(chart name, title, pass@k columns): the held-out set's eval/pass@k, then each eval set's
    eval/<name>/pass@k (retention sets among them)."""
    main = sorted(c for c in evals if c.startswith("eval/pass@"))
    names = sorted({c.split("/")[1] for c in evals if c.count("/") == 2 and "/pass@" in c})
    return ([("pass_at_k", "held-out pass@k (unbiased)", main)] if main else []) + [
        (f"pass_at_k_{n}", f"eval set {n}: pass@k (unbiased)", sorted(c for c in evals if c.startswith(f"eval/{n}/pass@")))
        for n in names]


def _config_value(run_dir: str, keys: tuple[str, ...], default):
    try:
        import yaml

        with open(os.path.join(run_dir, "config.yaml")) as f:
            node = yaml.safe_load(f)
        for k in keys:
            node = node[k]
        return node
    except (OSError, KeyError, TypeError, ValueError):
        return default
