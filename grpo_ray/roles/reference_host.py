"""Where the frozen reference runs, behind one interface for the driver: an actor of its own
(ReferenceActor), or inside the learner ranks' processes (LearnerReference,
resources.reference_host=learner), each rank scoring a share of the rows.

In the learner ranks there is no process to start (on a CPU box the reference's own imports
and model load were ~5 CPU-s of the start-up, benchmarks/RESULTS.md) and no device of its own;
every rank holds a copy of the reference. As OpenRLHF's colocated actor/reference and verl's
actor-rollout-ref worker do, at the cost of that copy's memory on each rank. Its calls run in
the ranks' "reference" concurrency group, so an asynchronous step's pass, queued behind the next
rollout's sampling, does not hold up the update queued after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from .waiting import Bound, wait_all

GROUP = "reference"  # the learner ranks' Ray concurrency group for the hosted reference's calls


@dataclass
class ReferencePass:
    """A reference pass under way: refs[i] (ObjectRef[Tensor [rows_i, T]]) is owners[i]'s share
    of the rows, in row order."""
    refs: list
    owners: list[str]

    def result(self, bound: Bound) -> torch.Tensor:
        """ref_logprobs [B, T] (raises waiting.Stalled naming the owner that stalled)."""
        parts = wait_all(self.refs, self.owners, "logprobs", bound)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def cancel(self) -> None:
        for ref in self.refs:
            ray.cancel(ref)


class ReferenceActor:
    """The reference in an actor of its own (roles/reference.py's Reference)."""
    restartable = True

    def __init__(self, actor):
        self.actor = actor
        self.actors = [actor]  # its own actors: waited for at start, killed at the end

    def rollout_pass(self, pad_id: int, parts: list, group: int) -> ReferencePass:
        """The pass over a rollout's parts (ObjectRefs still sampling: it runs once they are done)."""
        return ReferencePass([self.actor.rollout_logprobs.remote(pad_id, *parts)], ["the reference"])

    def batch_pass(self, batch, group: int) -> ReferencePass:
        return ReferencePass([self.actor.logprobs.remote(batch)], ["the reference"])


class LearnerReference:
    """The reference in every learner rank's process, rank i scoring share i of the rows (cut
    between whole prompt groups: records.row_share)."""
    restartable = False  # the learner ranks have no restarts: a stall stops the run

    def __init__(self, learners: list, names: list[str] | None = None):
        """names: each rank's, as the learner group names it in stall messages (node, pid)."""
        self.learners = learners
        self.actors: list = []  # none of its own: the learner ranks' processes
        self.owners = [f"the reference in {n}" for n in names or [f"learner rank {r}" for r in range(len(learners))]]

    def _share(self, rank: int, group: int) -> tuple[int, int, int]:
        return rank, len(self.learners), group

    def rollout_pass(self, pad_id: int, parts: list, group: int) -> ReferencePass:
        return ReferencePass([lr.frozen_rollout_logprobs.options(concurrency_group=GROUP).remote(
            pad_id, self._share(r, group), *parts) for r, lr in enumerate(self.learners)], self.owners)

    def batch_pass(self, batch, group: int) -> ReferencePass:
        ref = ray.put(batch)  # once, for every rank
        return ReferencePass([lr.frozen_logprobs.options(concurrency_group=GROUP).remote(ref, self._share(r, group))
                              for r, lr in enumerate(self.learners)], self.owners)

    def reload(self, model_path: str, options: dict, bound: Bound) -> None:
        """Every rank's copy from another folder (a reference reset, a rollback), awaited within
        the stall bound. The load runs in the reference's thread, and transformers' loading
        touches process-wide state (the default dtype): the driver calls it only when no other
        call of the ranks runs (after a save or a load_state it awaited)."""
        wait_all([lr.load_frozen.options(concurrency_group=GROUP).remote(model_path, **options)
                  for lr in self.learners], self.owners, "load_frozen", bound)
