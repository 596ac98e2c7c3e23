"""Typed records passed between the driver and the actors.

One vocabulary throughout: `logprobs` (current policy), `old_logprobs` (the sampler's, recorded at
rollout time), `ref_logprobs` (frozen reference), `advantages`, `response_mask`.
Shapes: B = completions in the batch, P = padded prompt length, T = padded response length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .score import Score  # noqa: F401  (re-exported: the records passed between phases)


@dataclass
class Trajectory:
    """How one completion of a multi-turn rollout went (Rollout.trajectories): its response is
    the model's turns with the environment's observations between them, whose tokens are in the
    sequence (the learner and the reference see them) but carry no loss, KL or entropy."""
    turns: int = 1                  # model turns
    tool_calls: int = 0
    tool_errors: int = 0
    # [start, end) of each observation's tokens in the response (response_ids' indices)
    observations: list[tuple[int, int]] = field(default_factory=list)
    reward: float | None = None     # the environment's, when it ended the trajectory with one
    error: str | None = None        # the environment failed: the trajectory scores 0 with this reason
    segments: list[tuple[str, str]] = field(default_factory=list)  # ("model" | "env", text), for spot checks

    @property
    def observation_tokens(self) -> int:
        return sum(end - start for start, end in self.observations)


@dataclass
class Rollout:
    """Completions of one step; completion i answers prompt i // group_size (groups contiguous)."""
    prompt_ids: list[list[int]]      # [B][prompt_len_i]
    response_ids: list[list[int]]    # [B][response_len_i], EOS included when sampled
    old_logprobs: list[list[float]]  # [B][response_len_i], the sampler's logprob of each token
    texts: list[str]                 # [B] decoded responses
    truncated: list[bool]            # [B] stopped by max_new_tokens rather than EOS
    weight_version: int = 0          # learner step whose weights sampled this rollout
    # seconds the generate call waited on its generator behind earlier calls; in sync mode, the
    # part of the weight load (queued, not awaited) that the next rollout still had to wait for
    queued_s: float = 0.0
    # seconds the generator spent sampling it (its busy time: async mode's `generate` phase only
    # shows the wait, and the overlap is judged against this)
    sample_s: float = 0.0
    # [B] the index of the generator that sampled each row (its part in the fleet's launch), for
    # the weight-sync parity guard; filled by concat (part i's rows are generator i's), kept by
    # select_groups; [] when unknown (a part straight from one generator)
    generators: list[int] = field(default_factory=list)
    # [B] multi-turn rollouts (env.name): each row's turns; [] for single-turn rollouts
    trajectories: list[Trajectory] = field(default_factory=list)
    # seconds the generator waited on environment calls with nothing left to sample (the tools'
    # share of the critical path)
    env_s: float = 0.0

    def __len__(self) -> int:
        return len(self.response_ids)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        versions = {p.weight_version for p in parts}
        if len(versions) > 1:
            raise RuntimeError(f"generators sampled with different weight versions {sorted(versions)}")
        return Rollout(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            response_ids=[x for p in parts for x in p.response_ids],
            old_logprobs=[x for p in parts for x in p.old_logprobs],
            texts=[x for p in parts for x in p.texts],
            truncated=[x for p in parts for x in p.truncated],
            weight_version=versions.pop() if versions else 0,
            queued_s=max((p.queued_s for p in parts), default=0.0),
            sample_s=max((p.sample_s for p in parts), default=0.0),  # generators run side by side
            # a generator's part has none: its index in parts; a joined selection keeps its own
            generators=[g for i, p in enumerate(parts) for g in (p.generators or [i] * len(p))],
            trajectories=_joined_trajectories(parts),
            env_s=max((p.env_s for p in parts), default=0.0),
        )


    def select_groups(self, groups: list[int], group_size: int) -> Rollout:
        """The completions of the given prompt groups, in that order."""
        rows = [g * group_size + k for g in groups for k in range(group_size)]
        return Rollout([self.prompt_ids[i] for i in rows], [self.response_ids[i] for i in rows],
                       [self.old_logprobs[i] for i in rows], [self.texts[i] for i in rows],
                       [self.truncated[i] for i in rows], self.weight_version, self.queued_s, self.sample_s,
                       [self.generators[i] for i in rows] if self.generators else [],
                       [self.trajectories[i] for i in rows] if self.trajectories else [], self.env_s)


def _joined_trajectories(parts: list[Rollout]) -> list[Trajectory]:
    """The parts' trajectories in order; [] for single-turn parts. A mix would drop the
    observation masks of the multi-turn rows (their observation tokens would carry loss)."""
    nonempty = [p for p in parts if len(p)]
    if not any(p.trajectories for p in nonempty):
        return []
    if not all(p.trajectories for p in nonempty):
        raise RuntimeError("a rollout joins multi-turn parts with single-turn ones: their observation masks "
                           "would be lost")
    return [t for p in nonempty for t in p.trajectories]


@dataclass
class TrainBatch:
    """Padded tensors for the reference and the learner: prompts left-padded, responses
    right-padded, so every response starts at column P and logits[:, P-1:P+T-1] predict it."""
    input_ids: torch.Tensor          # [B, P+T] long
    attention_mask: torch.Tensor     # [B, P+T] long, 0 on padding
    response_mask: torch.Tensor      # [B, T] float, 1 on response tokens that count in the loss
    old_logprobs: torch.Tensor       # [B, T] float32
    advantages: torch.Tensor         # [B] float32
    prompt_len: int                  # P
    ref_logprobs: torch.Tensor | None = None  # [B, T] float32, filled by the reference
    sampler_logprobs: torch.Tensor | None = None  # [B, T] the sampler's, when the learner recomputes old_logprobs

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on `device` (a no-op on the CPU)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def response_ids(self) -> torch.Tensor:  # [B, T]
        return self.input_ids[:, self.prompt_len:]

    @staticmethod
    def from_rollout(rollout: Rollout, advantages: torch.Tensor, pad_id: int) -> TrainBatch:
        B = len(rollout)
        P = max(len(p) for p in rollout.prompt_ids)
        T = max(1, max(len(r) for r in rollout.response_ids))
        input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + T), dtype=torch.long)
        response_mask = torch.zeros((B, T), dtype=torch.float32)
        old_logprobs = torch.zeros((B, T), dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(rollout.prompt_ids, rollout.response_ids, rollout.old_logprobs)):
            input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, P - len(p):P] = 1
            if r:
                input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, P:P + len(r)] = 1
                response_mask[i, :len(r)] = 1.0
                old_logprobs[i, :len(r)] = torch.tensor(lp, dtype=torch.float32)
        for i, traj in enumerate(rollout.trajectories):  # observations: in the sequence, not in the loss
            for start, end in traj.observations:
                response_mask[i, start:end] = 0.0
                old_logprobs[i, start:end] = 0.0
        return TrainBatch(input_ids, attention_mask, response_mask, old_logprobs,
                          advantages.float(), P)

    def select(self, rows: slice | torch.Tensor) -> TrainBatch:
        """Rows of the batch with all-padding columns trimmed on both sides (less compute)."""
        am = self.attention_mask[rows]
        P = self.prompt_len
        used_prompt = am[:, :P].any(dim=0).nonzero()
        start = int(used_prompt[0]) if len(used_prompt) else P - 1
        used_resp = self.response_mask[rows].any(dim=0).nonzero()
        end = int(used_resp[-1]) + 1 if len(used_resp) else 1
        def cut(t):
            return t[rows][:, :end] if t is not None else None

        return TrainBatch(self.input_ids[rows][:, start:P + end], am[:, start:P + end],
                          cut(self.response_mask), cut(self.old_logprobs), self.advantages[rows], P - start,
                          cut(self.ref_logprobs), cut(self.sampler_logprobs))

    def prompt_index(self) -> torch.Tensor:
        """[B] the index of each row's prompt among the batch's distinct prompts."""
        P = self.prompt_len
        key = torch.cat([self.input_ids[:, :P], self.attention_mask[:, :P]], dim=1)
        return torch.unique(key, dim=0, return_inverse=True)[1]

    def micro_batches(self, size: int, by_prompt: bool = False) -> list[tuple[torch.Tensor, TrainBatch]]:
        """(rows, micro-batch) pairs of at most `size` rows. The order does not change the loss:
        every micro-batch divides by the same normaliser.

        Rows are ordered by response length, so that each micro-batch is padded only to its own
        longest response (on an early step of the default job, lengths 4-14 in two micro-batches:
        a third fewer response tokens); with by_prompt, by prompt first, so that a group's
        completions share a micro-batch and can be packed behind their one prompt pass."""
        order = self.response_mask.sum(dim=1)
        if by_prompt:
            order = order + self.prompt_index() * (self.response_mask.shape[1] + 1)
        order = order.argsort(stable=True)
        return [(order[i:i + size], self.select(order[i:i + size])) for i in range(0, self.size, size)]


def padded_batch(parts: list[Rollout], pad_id: int, advantages: torch.Tensor | None = None) -> TrainBatch:
    """The one padded layout of a rollout (given as its generators' parts, in order) that the
    reference pass and the learner both see: the reference computes its logprobs on the parts
    before the driver has joined them, so both must pad them the same way. advantages [B]
    (zeros when only logprobs are wanted)."""
    rollout = parts[0] if len(parts) == 1 else Rollout.concat(parts)
    return TrainBatch.from_rollout(rollout, torch.zeros(len(rollout)) if advantages is None else advantages, pad_id)


def row_share(rows: int, index: int, count: int, group: int = 1) -> slice:
    """Share `index` of `count` of a batch's rows: contiguous, cut between whole groups of
    `group` rows (a prompt's completions stay together, so each share still runs each prompt
    once) when group divides rows, else between rows. Shares differ by at most one group."""
    unit = group if group > 0 and rows % group == 0 else 1
    units = rows // unit
    return slice(index * units // count * unit, (index + 1) * units // count * unit)
