"""Held-out evaluation: sample `samples` completions per prompt, verify them, and report the
unbiased pass@k (Chen et al. 2021) for each k. The same code runs inside training and from
`grpo-ray eval`."""
from __future__ import annotations

from .metrics import mean_pass_at_k
from .rollout import sample

EVAL_SEED = 1_000_003  # fixed: successive evaluations differ by the model, not the dice


def correctness(score) -> float:
    """pass@k counts correct answers, not the weighted sum with format or other components."""
    return score.components.get("correct", score.reward)


def evaluate(generators: list, verifier, records: list[dict], *, samples: int, ks: list[int],
             temperature: float, max_new_tokens: int, top_p: float = 1.0) -> tuple[dict, list[dict]]:
    """Returns ({"eval/pass@k": ...}, per-problem rows with num_samples and num_correct).
    `verifier` is anything with score(records, responses) -> list[Score] (the VerifierPool)."""
    rollout = sample(generators, [r["prompt"] for r in records], n=samples, temperature=temperature,
                     max_new_tokens=max_new_tokens, top_p=top_p, seed=EVAL_SEED)
    expanded = [r for r in records for _ in range(samples)]
    scores = verifier.score(expanded, rollout.texts)
    rows = []
    for i, rec in enumerate(records):
        group = scores[i * samples:(i + 1) * samples]
        rows.append({"prompt": rec["prompt"], "answer": rec.get("answer"), "num_samples": samples,
                     "num_correct": sum(correctness(s) >= 0.99 for s in group),
                     "example": rollout.texts[i * samples]})
    n, c = [r["num_samples"] for r in rows], [r["num_correct"] for r in rows]
    metrics = {f"eval/pass@{k}": mean_pass_at_k(n, c, k) for k in ks}
    metrics["eval/mean_reward"] = sum(s.reward for s in scores) / max(len(scores), 1)
    return metrics, rows
