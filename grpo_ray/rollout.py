"""Fan-out helpers the driver uses every step: split prompts across generators, sample in
parallel, and put the results back in order. (Scoring fans out in verifier_pool.py.)"""
from __future__ import annotations

import ray


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (empty ones dropped)."""
    size, rem = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < rem)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


def sample(generators: list, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int,
           top_p: float, seed: int) -> list:
    """Prompts split across generators, sampled in parallel; one Rollout per generator, in
    order (Rollout.concat joins them; the caller checks their weight versions first)."""
    chunks = split(prompts, len(generators))
    refs, offset = [], 0
    for gen, chunk in zip(generators, chunks):
        refs.append(gen.generate.remote(chunk, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                        top_p=top_p, seed=seed + offset * n))
        offset += len(chunk)
    return ray.get(refs)

