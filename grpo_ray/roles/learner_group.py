"""The learner group: the driver's one handle on the learner ranks (one Learner actor each,
one process group). It fans every call out over the ranks and keeps the backend's rule for
reading whole parameters inside: under a sharding backend (DeepSpeed ZeRO-3) every rank must
take part in a gather, otherwise rank 0 alone holds them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import ray

from ..core.algorithm import loss_normalizer
from ..core.metrics import ROW_MISMATCH, combine_parts
from ..core.records import TrainBatch
from .fleet import split
from .waiting import Bound, locations, wait_all


@dataclass
class Update:
    """An update in flight: each rank's metrics (ObjectRefs) and rank 0's new weights (a ref
    to its buckets, packed in the same call, so the generators' load can be queued on it at
    once), and where each rank's shares start in the batch (starts[rank][j]: the batch row of
    its share of mini-batch j)."""
    stats: list
    weights: ray.ObjectRef
    starts: list[list[int]] = field(default_factory=list)
    broadcast: bool = False  # weights holds layouts: rank 0 broadcasts the bytes (sync.method=collective)


class LearnerGroup:
    def __init__(self, actors: list, gather_on_all_ranks: bool, dtype: str = "float32", bound: Bound | None = None,
                 lora: bool = False, collective: bool = False):
        """gather_on_all_ranks: reading whole parameters (weights for the generators, a saved
        policy) needs every rank (backends.full_params_need_all_ranks). dtype: the generators'
        weights (model.dtype). bound: how long a call may go without progress
        (run.stall_timeout_s): a rank that stalls raises waiting.Stalled naming it; ranks are
        not restarted (their process group and optimizer state would be lost), the run stops.
        lora: the policy is a LoRA adapter on a frozen base (model.lora). collective: rank 0 keeps
        each update's weights and broadcasts them (sync.method=collective, roles/collective.py)."""
        self.actors, self.dtype, self.bound, self.lora = actors, dtype, bound or Bound(None), lora
        self.collective = collective
        self._gathering = actors if gather_on_all_ranks else actors[:1]
        self.names = [f"learner rank {r}" for r in range(len(actors))]
        if self.bound.stall_s is not None:  # where each rank runs, asked while it can answer
            self.names = [f"learner rank {r} ({at})" for r, at in enumerate(locations(actors))]

    def wait(self, refs: list, call: str, ranks: list[int] | None = None) -> list:
        """The results of one call per rank (ranks: which ranks made them; default all), bounded."""
        names = [self.names[r] for r in (ranks if ranks is not None else range(len(refs)))]
        try:
            return wait_all(refs, names, call, self.bound)
        except ray.exceptions.RayTaskError:
            # a rank that died is the cause; the survivors' collectives then fail ("connection
            # closed by peer"), and whichever error Ray reports first must not hide the death
            for ref in refs:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    raise
                except Exception:
                    continue
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def update(self, batch: TrainBatch, *, mini_batches: int, aggregation: str, max_tokens: int,
               epochs: int) -> Update:
        """Start the update: `mini_batches` optimizer steps per pass, `epochs` passes.
        Mini-batch j is a contiguous 1/mini_batches of the batch (whole groups when they divide
        evenly); with M ranks each takes a contiguous 1/M of every mini-batch. All divide by the
        normaliser of the WHOLE mini-batch, so the gradient does not depend on the split across
        ranks and micro-batches."""
        shares: list[list[TrainBatch]] = [[] for _ in self.actors]
        normalizers, starts = [], [[] for _ in self.actors]
        for mb_rows in split(list(range(batch.size)), mini_batches):
            mb = batch.select(slice(mb_rows[0], mb_rows[-1] + 1))
            normalizers.append(loss_normalizer(mb.response_mask, aggregation, max_tokens))
            for share, start, rows in zip(shares, starts, split(list(range(mb.size)), len(self.actors))):
                share.append(mb.select(slice(rows[0], rows[-1] + 1)))
                start.append(mb_rows[0] + rows[0])
        stats, weights = [], []
        for rank, (actor, share) in enumerate(zip(self.actors, shares)):
            if rank < len(self._gathering):  # every gathering rank packs; rank 0's buckets are sent
                part, buckets = actor.update_then_pack.options(num_returns=2).remote(
                    share, normalizers, epochs, self.dtype, self.collective)
                weights.append(buckets)
            else:
                part = actor.update.remote(share, normalizers, epochs)
            stats.append(part)
        return Update(stats, weights[0], starts, broadcast=self.collective)

    def results(self, update: Update) -> tuple[dict, list[tuple[int, float, float]]]:
        """The update's metrics, the ranks' combined (core.metrics.combine_parts), and the
        sampler/learner mismatch per batch row it was measured on: [(batch row, summed
        old_logprobs - logprobs, tokens)] (the driver's parity guard attributes them to generators)."""
        parts = self.wait(update.stats, "update")
        rows = [(update.starts[rank][j] + i, summed, tokens) for rank, part in enumerate(parts)
                for j, i, summed, tokens in part.pop(ROW_MISMATCH, [])]
        return combine_parts(parts), rows

    def weight_buckets(self) -> ray.ObjectRef:
        """The current weights as buckets for the generators (a ref to rank 0's)."""
        return [lr.weight_buckets.remote(self.dtype) for lr in self._gathering][0]

    def sync_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight-sync group's store (sync.method=collective)."""
        return self.wait([self.actors[0].sync_address.remote()], "sync_address")[0]

    def join_sync_group(self, address) -> ray.ObjectRef:
        """Rank 0 joins a new weight-sync group as its rank 0 (not awaited: every member joins at once)."""
        return self.actors[0].join_sync_group.remote(address)

    def keep_weights(self) -> ray.ObjectRef:
        """Rank 0 packs the current weights and keeps them for broadcast(): a ref to their layouts."""
        return [lr.keep_weights.remote(self.dtype) for lr in self._gathering][0]

    def broadcast(self) -> ray.ObjectRef:
        """Rank 0 broadcasts the weights its last update kept (not awaited)."""
        return self.actors[0].broadcast_weights.remote()

    def kept_buckets(self) -> ray.ObjectRef:
        """Those weights as buckets, for a push through the object store instead."""
        return self.actors[0].kept_buckets.remote()

    def save_policy(self, out_dir: str) -> None:
        """The policy in Hugging Face format with its tokenizer (transformers and vLLM load it as
        is); not atomic (the caller writes into a temp folder)."""
        self.wait([lr.save_pretrained.remote(out_dir) for lr in self._gathering], "save_pretrained")

    def save_adapter(self, out_dir: str) -> None:
        """A LoRA policy's adapter in PEFT's format; not atomic (the caller writes into a temp folder)."""
        self.wait([lr.save_adapter.remote(out_dir) for lr in self._gathering], "save_adapter")

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) parameters of the policy."""
        return self.wait([self.actors[0].parameter_counts.remote()], "parameter_counts")[0]

    def save_state(self, out_dir: str) -> None:
        """Weights, optimizer moments and LR schedule: every rank writes its own shard."""
        self.wait([lr.save_state.remote(out_dir) for lr in self.actors], "save_state")

    def load_state(self, in_dir: str, wait: bool = True) -> list:
        """Restore save_state's folder on every rank (wait=False: the refs, to await with others)."""
        refs = [lr.load_state.remote(in_dir) for lr in self.actors]
        return self.wait(refs, "load_state") if wait else refs

    def scale_lr(self, factor: float) -> float:
        """Multiply every rank's learning rate; returns the new one."""
        return self.wait([lr.scale_lr.remote(factor) for lr in self.actors], "scale_lr")[0]

    def checkpoint_into(self, folder: str) -> None:
        """A checkpoint's learner part: policy/ (Hugging Face; a LoRA policy merged), adapter/ (a
        LoRA policy's adapter, PEFT's format) and learner/ (backend state)."""
        self.save_policy(os.path.join(folder, "policy"))
        if self.lora:
            self.save_adapter(os.path.join(folder, "adapter"))
        self.save_state(os.path.join(folder, "learner"))
