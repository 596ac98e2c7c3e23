"""Training and evaluation statistics (torch and numpy only) and the metrics file writer."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, Codex paper): 1 - C(n-c, k) / C(n, k), computed as a
    running product so it stays exact for large n instead of overflowing binomials."""
    n, c = int(num_samples), int(num_correct)
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(num_samples: list[int], num_correct: list[int], k: int) -> float:
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)]))


def reward_stats(rewards: torch.Tensor, group_size: int, correct: torch.Tensor | None = None) -> dict[str, float]:
    """rewards: [num_prompts * group_size], groups contiguous. correct: [same] each completion's
    correctness (the `correct` component; the reward when None), which splits the zero-std groups
    into all solved (every member 1: too easy) and all failed (every member 0: too hard). Judged
    against the batch's best and worst reward instead, a batch with no correct answer counted
    every group as both, and a format bonus on all-wrong groups as solved.

    reward/std is the mean within-group std (population), as TRL logs it: it is what the
    advantages are normalised by, and what the guide's < 0.3 / > 2.0 thresholds speak about.
    """
    groups = rewards.double().view(-1, group_size)  # float64, as the advantages (step.shaped_rewards)
    std = groups.std(dim=1, unbiased=False)
    top, bottom = groups.max(dim=1).values, groups.min(dim=1).values
    zero = top == bottom  # the groups group_advantages gives zeros (any difference is normalised up)
    ok = (rewards if correct is None else correct).float().view(-1, group_size)
    return {
        "reward/mean": float(groups.mean()),
        "reward/std": float(std.mean()),
        "reward/batch_std": float(rewards.double().std(unbiased=False)),
        "reward/frac_zero_std": float(zero.float().mean()),
        # zero-std groups split by cause: all solved (too easy) vs all failed (too hard)
        "reward/frac_all_max": float((zero & (ok >= 1.0).all(dim=1)).float().mean()),
        "reward/frac_all_min": float((zero & (ok <= 0.0).all(dim=1)).float().mean()),
    }


def advantage_variance(advantages: torch.Tensor) -> float:
    """Population variance of the advantages (guide target: 0.5-1.5). Zero-std groups contribute
    zeros, so a batch with many of them shows a low variance: little learning signal."""
    return float(advantages.float().var(unbiased=False))


# loss, pg_loss, tokens: already divided by the global normaliser, parts add up; sync/bytes: only
# the rank whose weights are sent packs any
SUMMED = ("loss", "pg_loss", "tokens", "sync/bytes")


def combine_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Fold metrics of micro-batches (or learner ranks) into the batch's: losses and token counts
    add up, ratio/max and ratio/min are extremes, lists are joined, everything else is a mean
    weighted by each part's `tokens`."""
    tokens = sum(p["tokens"] for p in parts)
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if k in SUMMED:
            out[k] = sum(vals)
        elif isinstance(vals[0], list):  # per-row records (the learner's ROW_MISMATCH): joined
            out[k] = [x for v in vals for x in v]
        elif k == "ratio/max":
            out[k] = max(vals)
        elif k == "ratio/min":
            out[k] = min(vals)
        else:
            out[k] = sum(v * p["tokens"] for v, p in zip(vals, parts)) / max(tokens, 1.0)
    return out


# the learner's sampler/learner mismatch per row it measured, under this key of its update's
# metrics: [(mini-batch j of its share, row in that share, summed old_logprobs - logprobs, tokens)];
# the learner group maps the rows to batch rows (LearnerGroup.results)
ROW_MISMATCH = "sampler_kl/rows"


def row_mismatch(rows: torch.Tensor, diff: torch.Tensor, mask: torch.Tensor, shard: int = 0) -> list[tuple]:
    """[(shard, row, sum over the row's tokens of diff, tokens)] for rows [b] (each row's index in
    its shard), diff and mask [b, T]: a few numbers a row, not a list per token."""
    sums, tokens = (diff * mask).sum(dim=1).tolist(), mask.sum(dim=1).tolist()
    return [(shard, int(r), s, n) for r, s, n in zip(rows.tolist(), sums, tokens)]


def mismatch_by_generator(rows: list[tuple[int, float, float]], generators: list[int]) -> dict[int, tuple[float, float]]:
    """{generator: (its sampler_kl, tokens)}: the token-weighted mean of the mismatch over the batch
    rows [(batch row, summed mismatch, tokens)] each generator sampled (generators[row]: its
    index); generators with no measured token are left out, and all when the rows' generators
    are not known (generators empty)."""
    out: dict[int, list[float]] = {}
    if not generators:
        return {}
    for row, summed, tokens in rows:
        acc = out.setdefault(generators[row], [0.0, 0.0])
        acc[0], acc[1] = acc[0] + summed, acc[1] + tokens
    return {g: (s / n, n) for g, (s, n) in sorted(out.items()) if n > 0}


def threshold_warnings(m: dict[str, float], kl_stop: float | None) -> dict[str, str]:
    """The guide's monitoring thresholds, in plain words with causes and fixes: {kind: message},
    where kind is a stable name (messages carry the measured values)."""
    out = {}
    std = m.get("reward/std", float("nan"))
    if std < 0.3:
        out["low_reward_std"] = (
            f"low reward variance (std {std:.2f} < 0.3): {m.get('reward/frac_all_max', 0):.0%} of groups all "
            f"solved, {m.get('reward/frac_all_min', 0):.0%} all failed; raise temperature, use harder/easier "
            "prompts, or check the verifier is not too strict or too lax")
    elif std > 2.0:
        out["high_reward_std"] = (
            f"high reward variance (std {std:.2f} > 2.0): noisy verifier, group too small, or prompts too "
            "diverse; increase algo.group_size or filter outliers")
    var = m.get("advantage/variance", float("nan"))
    if not math.isnan(var) and not 0.5 <= var <= 1.5:
        out["advantage_variance"] = (
            f"advantage variance {var:.3f} outside 0.5-1.5 (many equal-reward groups carry no signal)")
    if kl_stop is not None and m.get("kl", 0.0) > kl_stop:
        out["kl"] = (f"KL {m['kl']:.4f} > algo.kl_stop={kl_stop} this step: the policy is drifting from the "
                     "reference (the run stops if the median over algo.kl_window steps stays above)")
    return out


class Monitor:
    """Per-step checks against the guide's thresholds.

    Warnings are reported when they start, not on every step they persist. The KL stop reads the
    median of the last `kl_window` steps: k3 is unbiased but heavy-tailed (one rarely sampled
    token can lift a batch's mean tenfold), so sustained drift stops the run and a single outlier
    batch does not.
    """

    def __init__(self, kl_stop: float | None, kl_window: int):
        """kl_stop None: no KL rule (algo.kl_stop=null)."""
        self.kl_stop, self.kl_window = kl_stop, kl_window
        self.active: set[str] = set()
        self.recent_kl: list[float] = []
        self.first_lengths: list[float] = []  # response length of the first 3 steps: the baseline
        self.rewards_since_eval: list[float] = []
        self.last_eval: tuple[float | None, float] | None = None  # (mean train reward before it, pass@1)

    def check(self, m: dict[str, float]) -> tuple[list[str], str | None]:
        """Returns (new warnings, stop reason or None)."""
        warnings = {**threshold_warnings(m, self.kl_stop), **self._length_warnings(m)}
        if "reward/mean" in m:
            self.rewards_since_eval.append(m["reward/mean"])
        new = [w for kind, w in warnings.items() if kind not in self.active]
        self.active = set(warnings)
        if self.kl_stop is None or "kl" not in m:
            return new, None
        self.recent_kl = (self.recent_kl + [m["kl"]])[-self.kl_window:]
        median = float(np.median(self.recent_kl))
        if len(self.recent_kl) == self.kl_window and median > self.kl_stop:
            return new, (f"KL median {median:.4f} over the last {self.kl_window} steps > algo.kl_stop="
                         f"{self.kl_stop}")
        return new, None

    def _length_warnings(self, m: dict[str, float]) -> dict[str, str]:
        """Response length collapse (< half the first steps') or explosion (> twice, or most
        completions cut off at max_new_tokens)."""
        length = m.get("response_length/mean", float("nan"))
        if math.isnan(length):
            return {}
        if len(self.first_lengths) < 3:
            self.first_lengths.append(length)
            return {}
        base = float(np.mean(self.first_lengths))
        if length < 0.5 * base:
            return {"length_collapse": (
                f"response length collapsed to {length:.1f} tokens from {base:.1f}: the policy may be "
                "exploiting a verifier that pays short answers; inspect the samples, or add a format reward")}
        if length > 2.0 * base or m.get("truncated/frac", 0.0) > 0.5:
            return {"length_explosion": (
                f"response length grew to {length:.1f} tokens from {base:.1f} ({m.get('truncated/frac', 0):.0%} "
                "truncated): raise rollout.max_new_tokens, or set algo.overlong=penalty (DAPO)")}
        return {}

    def check_eval(self, pass1: float) -> list[str]:
        """After a held-out evaluation: training reward up while pass@1 is down is the guide's
        reward-hacking signal (the policy pleases the verifier, not the task)."""
        reward = float(np.mean(self.rewards_since_eval)) if self.rewards_since_eval else float("nan")
        out = []
        if self.last_eval is not None and self.last_eval[0] is not None and not math.isnan(reward):
            prev_reward, prev_pass = self.last_eval
            if reward > prev_reward + 0.02 and pass1 < prev_pass - 0.02:
                out.append(f"possible reward hacking: training reward rose {prev_reward:.3f} -> {reward:.3f} while "
                           f"held-out pass@1 fell {prev_pass:.3f} -> {pass1:.3f}; inspect the samples and the "
                           "per-component rewards (reward/<name>/mean), tighten the verifier")
        self.last_eval, self.rewards_since_eval = (None if math.isnan(reward) else reward, pass1), []
        return out

    def state_dict(self) -> dict:
        return {"active": sorted(self.active), "recent_kl": list(self.recent_kl),
                "first_lengths": list(self.first_lengths), "rewards_since_eval": list(self.rewards_since_eval),
                "last_eval": list(self.last_eval) if self.last_eval else None}

    def load_state_dict(self, state: dict) -> None:
        self.active, self.recent_kl = set(state["active"]), list(state["recent_kl"])
        self.first_lengths = list(state.get("first_lengths", []))
        self.rewards_since_eval = list(state.get("rewards_since_eval", []))
        self.last_eval = tuple(state["last_eval"]) if state.get("last_eval") else None


class MetricsLog:
    """Append-only JSONL: one flushed line per record, so a crash loses at most the line being
    written and a resumed run appends instead of overwriting. A partial last line that such a
    crash (or a full disk) left is cut first, with a warning: appended to, it would glue onto the
    next record and make the file unreadable from there."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        repair_partial_line(path)
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def repair_partial_line(path: str, warn=None) -> int:
    """Make `path` end at a line boundary before appending to it: a last line without its newline
    that is a whole JSON record gets the newline; one that is not (cut mid-write) is removed and
    reported (to stderr, or warn(message)). Returns the number of bytes cut."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        start, chunk = size, 1 << 16  # the last newline, read back from the end in chunks
        while start > 0:
            lo = max(0, start - chunk)
            f.seek(lo)
            block = f.read(start - lo)
            nl = block.rfind(b"\n")
            if nl >= 0:
                start = lo + nl + 1
                break
            start = lo
        f.seek(start)
        tail = f.read()
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            return 0
        f.truncate(start)
    message = (f"{path} ended in a partial line ({len(tail)} bytes, left by a crash or a full disk mid-write); "
               f"cut it so the records appended from here stay readable")
    if warn is None:
        print(f"grpo-ray: warning: {message}", file=sys.stderr)
    else:
        warn(message)
    return len(tail)
