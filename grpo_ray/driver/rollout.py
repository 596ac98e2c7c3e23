"""Fan-out helpers the driver uses every step: split prompts across generators, sample in
parallel, and put the results back in order. (Scoring fans out in verifier_pool.py.)"""
from __future__ import annotations

import time
from dataclasses import dataclass

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


def launch(generators: list, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int,
           top_p: float, seed: int) -> list:
    """Prompts split across generators and sampled in parallel: one ObjectRef[Rollout] per
    generator, in prompt order. Nothing waits here."""
    chunks = split(prompts, len(generators))
    refs, offset = [], 0
    for gen, chunk in zip(generators, chunks):
        refs.append(gen.generate.remote(chunk, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                        top_p=top_p, seed=seed + offset * n, sent=time.time()))
        offset += len(chunk)
    return refs


def sample(generators: list, prompts: list[str], **kwargs) -> list:
    """launch() and wait: one Rollout per generator, in order (Rollout.concat joins them; the
    caller checks their weight versions first)."""
    return ray.get(launch(generators, prompts, **kwargs))


@dataclass
class InFlight:
    """A step's rollout sampled ahead, while the learner trains on the step before
    (rollout.asynchronous): its prompts are drawn and its generation started, not awaited."""
    step: int
    records: list[dict]
    refs: list            # one ObjectRef[Rollout] per generator
    version: int          # the weights it samples with (one update behind when it is trained on)
    sampler_state: dict   # the prompt sampler before these records were drawn: what a checkpoint saves
    ref_logprobs: object = None  # ObjectRef[Tensor [B, T]]: the reference pass, queued behind the sampling

    def wait(self) -> None:
        ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)

    def drop_reference(self) -> None:
        """Cancel the queued reference pass (its samples are thrown away): left running, it
        would delay the reference pass the step then waits for."""
        if self.ref_logprobs is not None:
            ray.cancel(self.ref_logprobs)
        self.ref_logprobs = None

