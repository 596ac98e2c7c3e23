"""`grpo-ray eval --model base=PATH --model final=PATH DATA`: several models on the same prompts
with the same seeds, and one table of pass@k per model with each model's difference from the
first and its bootstrap 95% interval over problems (paired: a resample draws the same problems
for both models, so the interval reflects how much the verdict depends on which problems were
drawn, not the sampling noise within them, which the shared seeds already hold equal).
"""
from __future__ import annotations

import csv
import os

import numpy as np

from ..core.metrics import pass_at_k

BOOTSTRAP_ROUNDS = 2000


def per_problem(rows: list[dict], k: int) -> np.ndarray:
    """[problems] unbiased pass@k of each problem (Chen et al. 2021) from its num_samples and
    num_correct."""
    return np.array([pass_at_k(int(r["num_samples"]), int(r["num_correct"]), k) for r in rows])


def bootstrap_interval(diff: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the mean of `diff` over problems resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(results: dict[str, list[dict]], ks: list[int], set_name: str = "eval") -> list[dict]:
    """One row per (model, k): pass@k, and against the first model the difference and its
    interval. `results`: model name -> per-problem rows in the same problem order."""
    names = list(results)
    prompts = [r["prompt"] for r in results[names[0]]]
    for name in names[1:]:
        if [r["prompt"] for r in results[name]] != prompts:
            raise ValueError(f"model {name!r} was evaluated on other prompts than {names[0]!r}")
    table = []
    for k in ks:
        base = per_problem(results[names[0]], k)
        for name in names:
            scores = per_problem(results[name], k)
            row = {"set": set_name, "model": name, "k": k, "pass@k": float(scores.mean()), "problems": len(scores)}
            if name != names[0]:
                low, high = bootstrap_interval(scores - base)
                row.update({"diff": float((scores - base).mean()), "ci95_low": low, "ci95_high": high})
            table.append(row)
    return table


def markdown(table: list[dict], first: str) -> str:
    lines = [f"| set | model | k | pass@k | vs {first} | 95% interval |", "|---|---|---|---|---|---|"]
    for r in table:
        vs = f"{r['diff']:+.3f}" if "diff" in r else ""
        ci = f"[{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}]" if "diff" in r else ""
        lines.append(f"| {r['set']} | {r['model']} | {r['k']} | {r['pass@k']:.3f} | {vs} | {ci} |")
    return "\n".join(lines) + "\n"


def write_compare(out_dir: str, table: list[dict]) -> list[str]:
    """compare.csv, compare.md and a bar chart per set (compare_<set>.png), each written to a
    temp name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "compare.csv"), os.path.join(out_dir, "compare.md")]
    fields = ["set", "model", "k", "pass@k", "problems", "diff", "ci95_low", "ci95_high"]
    with open(paths[0] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    with open(paths[1] + ".tmp", "w") as f:
        f.write(markdown(table, table[0]["model"]))
    for set_name in dict.fromkeys(r["set"] for r in table):
        rows = [r for r in table if r["set"] == set_name]
        models, ks = list(dict.fromkeys(r["model"] for r in rows)), sorted({r["k"] for r in rows})
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(ks) * len(models), 3.5))
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            vals = [next(r["pass@k"] for r in rows if r["model"] == model and r["k"] == k) for k in ks]
            ax.bar(np.arange(len(ks)) + i * width, vals, width, label=model)
        ax.set(xticks=np.arange(len(ks)) + width * (len(models) - 1) / 2, xticklabels=[f"pass@{k}" for k in ks],
               ylim=(0, 1), title=f"{set_name}: {rows[0]['problems']} problems")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"compare_{set_name}.png")
        fig.savefig(path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        paths.append(path)
    for path in paths[:2]:
        os.replace(path + ".tmp", path)
    return paths
