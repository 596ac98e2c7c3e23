"""Learner role: the algorithm side of a GRPO update. It computes the loss over micro-batches and
steps the optimizer once per mini-batch per pass (algo.mini_batches x algo.ppo_epochs; once per
rollout by default) through a training backend (roles/backends: the engine, the optimizer, the
process group; DeepSpeed today). World size 1 by default; M ranks (one Ray actor each) form one
process group and each takes 1/M of the batch.

Split invariance: every micro-batch on every rank divides by the same global normaliser
(algorithm.loss_normalizer over its whole mini-batch, on all ranks), and the backend makes the
gradient it steps with the sum of those losses' gradients over every micro-batch and rank (for
DeepSpeed: its own 1/GAS scaling off and the loss multiplied by the world size, because it
averages gradients across ranks; see backends/deepspeed.py). The sum over all micro-batches and
ranks is then exactly the full-batch loss, so the gradient does not depend on how the batch was
split.

Non-finite guard: a mini-batch whose loss (on any micro-batch) or combined gradient is not
finite does not step: backend.step(skip=...) drops its gradients and leaves the weights, optimizer
state and LR schedule as they were (see the backend for what each configuration checks). The
update's metrics count those steps in `nonfinite_steps` and leave them out of every mean, so a
NaN does not hide the steps that did train; when no step of the update applied, the metrics are
those of the skipped steps (a non-finite loss shows as such) and grad_norm is nan.

Nothing here changes the batches it is handed: recomputed old logprobs go into new TrainBatch
objects.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..core.algorithm import masked_mean, policy_loss, truncated_is_weights
from ..core.metrics import ROW_MISMATCH, SUMMED, combine_parts, row_mismatch
from ..models.lora import LoraSettings, adapter_files, merged_state_dict, save_merged, trainable_parameters, write_adapter
from ..models.lora import base_only as lora_base_only
from ..models.lora import wrap as lora_wrap
from ..models.modeling import batched_logprobs, disable_dropout, load_causal_lm, load_tokenizer, response_logprobs
from ..core.records import Rollout, TrainBatch
from .backends import BackendSettings, get_backend
from .reference import Reference
from .startup import StartupClock
from .collective import GroupAddress, SyncGroup, free_address
from .weight_sync import AdapterWeights, WeightBucket, layouts, pack_state_dict, payload_bytes


class Learner:
    def __init__(self, model_path: str, *, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 zero_stage: int = 0, warmup_steps: int = 0, dtype: str = "float32", loss_kwargs: dict | None = None,
                 micro_batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, threads: int = 2, seed: int = 0,
                 recompute_old_logprobs: bool = False, tis: str = "none", tis_cap: float = 2.0,
                 share_prompts: bool = True, temperature: float = 1.0, backend: str = "deepspeed",
                 lora: dict | None = None, base_reference: bool = False, sync_adapter: bool = False,
                 reference: dict | None = None):
        """backend: a name in roles.backends.BACKENDS; zero_stage is DeepSpeed's option.
        lora: model.lora's keys (rank > 0: train a PEFT adapter, the base frozen); base_reference:
        fill in the batches' ref_logprobs from the base with the adapter off (a LoRA run's
        reference: no reference actor runs); sync_adapter: the generators get the adapter alone
        (model.lora.sync=adapter), not merged weights. reference: the frozen reference's Reference
        keyword arguments when it runs in this rank's process (resources.reference_host=learner)."""
        self.clock = StartupClock()
        self.model_path, self.tokenizer = model_path, None  # its tokenizer goes with every saved policy
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.loss_kwargs = dict(loss_kwargs or {})
        self.recompute_old_logprobs, self.tis, self.tis_cap = recompute_old_logprobs or tis != "none", tis, tis_cap
        self.micro_batch_size, self.share_prompts = micro_batch_size, share_prompts
        self.temperature = temperature  # rollout.temperature: logprobs of the policy that sampled

        self.lora = LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])}) if lora else None
        self.base_reference = base_reference and self.lora is not None
        self.sync_adapter = sync_adapter and self.lora is not None

        def build_model():
            model = load_causal_lm(model_path, "float32")  # fp32 master weights; the backend applies dtype
            disable_dropout(model)  # the loss forward runs in train mode
            return lora_wrap(model, self.lora) if self.lora else model

        settings = BackendSettings(lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, warmup_steps=warmup_steps,
                                   dtype=dtype, rank=rank, world_size=world_size, master_addr=master_addr,
                                   master_port=master_port)
        self.backend = get_backend(backend)(build_model, settings, zero_stage=zero_stage)
        self.clock.mark(f"{backend} init")
        self.frozen = None  # the hosted reference (roles/reference_host.py)
        if reference is not None:
            self.load_frozen(**reference)
            self.clock.mark("reference model load")
        # updates done (saved with the state): a count, not a weight version, which only the
        # generator fleet keeps
        self.updates = 0

    def startup(self) -> dict[str, float]:
        """This actor's start-up marks (roles/startup.py)."""
        return self.clock.marks

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) parameters of the policy (whole sizes, also when ZeRO-3 partitions them)."""
        return trainable_parameters(self.backend.module)

    def update(self, mini_batches: list[TrainBatch], normalizers: list[float], epochs: int = 1) -> dict[str, float]:
        """`epochs` passes over this rank's share of each mini-batch, one optimizer step per
        mini-batch (DeepSeekMath's mu and the mini-batch split). old_logprobs stay the same for
        every pass, so from the second optimizer step on the ratio moves away from 1 and
        clipping acts. normalizers[j] is mini-batch j's normaliser over ALL ranks."""
        if self.base_reference:
            mini_batches = [dataclasses.replace(b, ref_logprobs=self.reference_logprobs(b)) for b in mini_batches]
        self.backend.train()
        mini_batches, mismatch = self._prepare_old_logprobs(mini_batches)
        steps = []  # (parts, grad norm, applied) per optimizer step
        for epoch in range(epochs):
            for j, (shard, normalizer) in enumerate(zip(mini_batches, normalizers)):
                # the sampler/learner mismatch is only clean before the first optimizer step
                parts = self._accumulate(shard, normalizer, measure_mismatch=mismatch is None and epoch == j == 0)
                applied = self.backend.step(skip=not all(math.isfinite(p["loss"]) for p in parts))
                steps.append((parts, self.backend.grad_norm(), applied))
        self.updates += 1
        return self._fold(steps, mismatch)

    def _prepare_old_logprobs(self, mini_batches: list[TrainBatch]) -> tuple[list[TrainBatch], dict | None]:
        """algo.recompute_old_logprobs: the learner's own logprobs before the update become
        old_logprobs; the sampler's move to sampler_logprobs (for TIS). Returns the mini-batches
        to train on (new TrainBatch objects: the ones handed in are left as they are) and the
        mismatch metrics over the whole share, or None when old_logprobs stay the sampler's."""
        if not self.recompute_old_logprobs:
            return mini_batches, None
        num, den, out, rows = 0.0, 0.0, [], []
        for j, shard in enumerate(mini_batches):
            shard = dataclasses.replace(shard, sampler_logprobs=shard.old_logprobs, old_logprobs=self.logprobs(shard))
            num += float(((shard.sampler_logprobs - shard.old_logprobs) * shard.response_mask).sum())
            den += float(shard.response_mask.sum())
            rows += row_mismatch(torch.arange(shard.size), shard.sampler_logprobs - shard.old_logprobs,
                                 shard.response_mask, j)
            out.append(shard)
        self.backend.train()
        return out, {"sampler_kl": num / max(den, 1.0), "mismatch_tokens": den, ROW_MISMATCH: rows}

    def _accumulate(self, shard: TrainBatch, normalizer: float, measure_mismatch: bool) -> list[dict]:
        """Backward over the shard's micro-batches (gradients add up until backend.step())."""
        parts = []
        for rows, mb in shard.micro_batches(self.micro_batch_size, by_prompt=self.share_prompts):
            mb = mb.to(self.backend.device)
            logprobs, entropy = response_logprobs(self.backend.model, mb, with_entropy=True,
                                                  entropy_grad=bool(self.loss_kwargs.get("entropy_coef")),
                                                  share_prompts=self.share_prompts, temperature=self.temperature)
            is_weights = None
            if self.tis != "none":
                is_weights = truncated_is_weights(mb.old_logprobs, mb.sampler_logprobs, mb.response_mask,
                                                  self.tis, self.tis_cap)
            loss, metrics = policy_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
                                        mb.response_mask, normalizer=normalizer, is_weights=is_weights,
                                        entropy=entropy, **self.loss_kwargs)
            self.backend.backward(loss)
            metrics["entropy"] = masked_mean(entropy.detach(), mb.response_mask)
            if is_weights is not None:
                metrics["tis/weight_mean"] = masked_mean(is_weights, mb.response_mask)
                metrics["tis/frac_capped"] = masked_mean((is_weights >= self.tis_cap).float(), mb.response_mask)
            part = {**{k: float(v) for k, v in metrics.items()}, "loss": loss.item(),
                    "tokens": float(mb.response_mask.sum())}
            if measure_mismatch:  # k1 estimate of KL(sampler || learner) on the sampled tokens
                part["sampler_kl"] = float(masked_mean(mb.old_logprobs - logprobs.detach(), mb.response_mask))
                # per row, for the parity guard (measured only: the loss above is as it was)
                part[ROW_MISMATCH] = row_mismatch(rows, mb.old_logprobs - logprobs.detach(), mb.response_mask)
            parts.append(part)
        return parts

    def _fold(self, steps: list[tuple[list[dict], float, bool]], mismatch: dict | None) -> dict[str, float]:
        """One set of metrics for the update: token-weighted means over every micro-batch of every
        pass; loss, pg_loss and tokens per optimizer step (so ranks still add up). Steps skipped as
        non-finite count in nonfinite_steps and are left out, unless no step applied. With
        sampler_kl, its rows under ROW_MISMATCH (core.metrics.row_mismatch: a few numbers a row)."""
        applied = [s for s in steps if s[2]]
        kept = applied or steps
        parts, norms = [p for s in kept for p in s[0]], [s[1] for s in applied]
        first = [p for p in parts if "sampler_kl" in p]
        out = combine_parts([{k: v for k, v in p.items() if k not in ("sampler_kl", ROW_MISMATCH)} for p in parts])
        for k in SUMMED:
            if k in out:  # sync/bytes is added below
                out[k] /= len(kept)
        if mismatch is not None:
            out["sampler_kl"], out[ROW_MISMATCH] = mismatch["sampler_kl"], mismatch[ROW_MISMATCH]
        elif first:
            out["sampler_kl"] = combine_parts([{"sampler_kl": p["sampler_kl"], "tokens": p["tokens"]}
                                               for p in first])["sampler_kl"]
            out[ROW_MISMATCH] = [r for p in first for r in p[ROW_MISMATCH]]
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        out["optimizer_steps"] = float(len(applied))  # applied
        out["nonfinite_steps"] = float(len(steps) - len(applied))
        out["sync/bytes"] = 0.0  # update_then_pack: what this rank packed for the generators
        return out

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current policy's logprobs [B, T] of the batch's responses (0 on padding)."""
        self.backend.eval()
        return batched_logprobs(self.backend.module, batch, self.micro_batch_size, self.share_prompts,
                                self.temperature)

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """ref_logprobs [B, T] of a LoRA run: the frozen base's, with the adapter off."""
        with lora_base_only(self.backend.module):
            return self.logprobs(batch)

    # The frozen reference hosted in this process (resources.reference_host=learner): a model of its
    # own beside the policy. The driver calls these in a Ray concurrency group of their own
    # (roles/reference_host.py), so that an async step's queued pass does not hold up update().
    def load_frozen(self, model_path: str, **options) -> None:
        """(Re)load the hosted reference from a model folder (a reference reset, a rollback)."""
        self.frozen = None  # the old copy freed before the new one loads: one copy at a time
        self.frozen = Reference(model_path, threads=0, **options)

    def frozen_logprobs(self, batch: TrainBatch, share: tuple[int, int, int]) -> torch.Tensor:
        """The hosted reference's logprobs of this rank's share of the batch (Reference.logprobs)."""
        return self.frozen.logprobs(batch, share)

    def frozen_rollout_logprobs(self, pad_id: int, share: tuple[int, int, int], *parts: Rollout) -> torch.Tensor:
        """The same over a rollout's parts (Reference.rollout_logprobs)."""
        return self.frozen.rollout_logprobs(pad_id, *parts, share=share)

    def weight_buckets(self, dtype: str = "float32", bucket_mb: int = 256) -> list[WeightBucket]:
        """The current weights as buckets for the generators (rank 0's are the ones sent); a LoRA
        policy's with the adapter folded in, or its adapter alone (sync_adapter)."""
        target = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        with self.backend.full_parameters(trainable_only=self.sync_adapter) as module:
            if self.rank != 0:
                return []
            if self.sync_adapter:
                return [AdapterWeights(adapter_files(module))]
            weights = merged_state_dict(module) if self.lora else module.state_dict().items()
            return pack_state_dict(weights, bucket_mb << 20, target)

    def update_then_pack(self, mini_batches: list[TrainBatch], normalizers: list[float], epochs: int = 1,
                         dtype: str = "float32", keep: bool = False) -> tuple[dict[str, float], list]:
        """update() then weight_buckets() in one call: with Ray's num_returns=2 the driver queues
        the generators' weight load on the buckets right away, and they travel the moment the
        update ends, without a round trip through the driver (~8 ms a step at the tiny size).
        keep (sync.method=collective): rank 0 keeps the buckets for broadcast_weights and returns
        their layouts, so the bytes never enter the object store."""
        stats = self.update(mini_batches, normalizers, epochs)
        buckets = self.keep_weights(dtype) if keep else self.weight_buckets(dtype)
        stats["sync/bytes"] = float(payload_bytes(buckets))  # rank 0's are sent; the others pack none
        return stats, buckets

    # ---------------------------------------------- sync.method=collective (rank 0; roles/collective.py)
    def keep_weights(self, dtype: str = "float32") -> list:
        """weight_buckets(), kept here for broadcast_weights: returns their layouts (an adapter's
        files, which are not broadcast, are returned as they are)."""
        self._outbox = None  # the last update's, if its push never took them: not two models at once
        buckets = self.weight_buckets(dtype)
        if buckets and isinstance(buckets[0], WeightBucket):
            self._outbox = buckets
            return layouts(buckets)
        return buckets

    def sync_address(self) -> tuple[str, int]:
        """Where this rank hosts the weight-sync group's store: its node's IP and a free port."""
        return free_address()

    def join_sync_group(self, address: GroupAddress) -> int:
        """Join (as rank 0) a new weight-sync group, dropping the old one."""
        self._sync = None
        self._sync = SyncGroup(address, 0)
        return 0

    def broadcast_weights(self) -> int:
        """Broadcast the buckets the last update_then_pack(keep=True) kept; returns bytes sent."""
        group, buckets = getattr(self, "_sync", None), getattr(self, "_outbox", None)
        if group is None or buckets is None:
            raise RuntimeError("broadcast_weights: no weight-sync group joined, or no update kept its weights")
        try:
            return group.send(buckets)
        finally:  # sent or failed, they are not needed again (a failed push is redone from the model)
            self._outbox = None

    def kept_buckets(self) -> list[WeightBucket]:
        """The buckets the last update kept, for a push through the object store instead (no
        group since a failure or a generator restart); handed over, not kept."""
        buckets, self._outbox = getattr(self, "_outbox", None) or [], None
        return buckets

    def save_state(self, out_dir: str) -> None:
        """Weights, optimizer moments and LR schedule (every rank writes its own shard of a sharded
        state, so every rank must call this)."""
        self.backend.save_state(out_dir, {"updates": self.updates})

    def load_state(self, in_dir: str) -> int:
        """Restore save_state's checkpoint; returns the update count it was saved at."""
        client = self.backend.load_state(in_dir)
        self.updates = int(client.get("updates", client.get("version", 0)))  # "version": before 2026-12
        return self.updates

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate from now on (KL rollback); returns the new current lr."""
        return self.backend.scale_lr(factor)

    def save_pretrained(self, out_dir: str) -> None:
        """The policy as a Hugging Face folder with the model's tokenizer, written by rank 0 (every
        rank must call this when backends.full_params_need_all_ranks)."""
        with self.backend.full_parameters() as module:
            if self.rank == 0 and self.lora:
                save_merged(module, out_dir)  # a plain Hugging Face model: no PEFT needed to load it
            elif self.rank == 0:
                module.save_pretrained(out_dir)
        if self.rank == 0:
            self.tokenizer = self.tokenizer or load_tokenizer(self.model_path)  # with a pad token (eos) if it had none
            self.tokenizer.save_pretrained(out_dir)

    def save_adapter(self, out_dir: str) -> None:
        """A LoRA policy's adapter in PEFT's format (PeftModel.from_pretrained loads it), by rank 0
        (every rank must call this when backends.full_params_need_all_ranks)."""
        with self.backend.full_parameters(trainable_only=True) as module:
            if self.rank == 0:
                write_adapter(adapter_files(module), out_dir)
