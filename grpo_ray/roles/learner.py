"""Learner role: a DeepSpeed engine that computes the GRPO loss over micro-batches and steps the
optimizer once per mini-batch per pass (algo.mini_batches x algo.ppo_epochs; once per rollout by
default). World size 1 by default; M ranks (one Ray actor each) form one
gloo/NCCL process group and each takes 1/M of the batch.

Split invariance: every micro-batch on every rank divides by the same global normaliser
(algorithm.loss_normalizer over its whole mini-batch, on all ranks), DeepSpeed's own 1/GAS scaling is off
(unmanaged accumulation, step() is the boundary), and the loss is multiplied by the world size
because DeepSpeed averages gradients across ranks. The sum over all micro-batches and ranks is
then exactly the full-batch loss, so the gradient does not depend on how the batch was split.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..core.algorithm import masked_mean, policy_loss, truncated_is_weights
from ..core.metrics import SUMMED, combine_parts
from ..models.modeling import batched_logprobs, disable_dropout, load_causal_lm, response_logprobs
from ..core.records import TrainBatch
from .weight_sync import WeightBucket, pack_state_dict


class Learner:
    def __init__(self, model_path: str, *, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 zero_stage: int = 0, warmup_steps: int = 0, dtype: str = "float32", loss_kwargs: dict | None = None,
                 micro_batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, threads: int = 2, seed: int = 0,
                 recompute_old_logprobs: bool = False, tis: str = "none", tis_cap: float = 2.0,
                 share_prompts: bool = True, temperature: float = 1.0):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        for key, value in {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}.items():
            os.environ[key] = value
        if not torch.cuda.is_available():  # else DeepSpeed probes every accelerator it knows
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        self.rank, self.world_size = rank, world_size
        self.loss_kwargs = dict(loss_kwargs or {})
        self.recompute_old_logprobs, self.tis, self.tis_cap = recompute_old_logprobs or tis != "none", tis, tis_cap
        self.micro_batch_size, self.share_prompts = micro_batch_size, share_prompts
        self.temperature = temperature  # rollout.temperature: logprobs of the policy that sampled
        model = load_causal_lm(model_path, "float32")  # fp32 master weights; bf16 via DeepSpeed
        disable_dropout(model)  # the loss forward runs in train mode
        # A client AdamW skips DeepSpeed's ~40 s fused_adam JIT build on CPU.
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
        }
        # Linear warm-up: Adam's first updates move every weight by ~lr whatever the gradient's
        # size, which on a sparse RL signal is a large, random step away from the reference.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.zero_stage = zero_stage
        self._reduced_norm: float | None = None
        self._measure_reduced_grad_norm()
        self.version = 0

    def update(self, mini_batches: list[TrainBatch], normalizers: list[float], epochs: int = 1) -> dict[str, float]:
        """`epochs` passes over this rank's share of each mini-batch, one optimizer step per
        mini-batch (DeepSeekMath's mu and the mini-batch split). old_logprobs stay the same for
        every pass, so from the second optimizer step on the ratio moves away from 1 and
        clipping acts. normalizers[j] is mini-batch j's normaliser over ALL ranks."""
        self.engine.train()
        mismatch = self._prepare_old_logprobs(mini_batches)
        parts, norms = [], []
        for epoch in range(epochs):
            for j, (shard, normalizer) in enumerate(zip(mini_batches, normalizers)):
                # the sampler/learner mismatch is only clean before the first optimizer step
                parts += self._accumulate(shard, normalizer, measure_mismatch=mismatch is None and epoch == j == 0)
                self.engine.step()
                norms.append(self._grad_norm())
        self.version += 1
        return self._fold(parts, norms, mismatch)

    def _prepare_old_logprobs(self, mini_batches: list[TrainBatch]) -> dict | None:
        """algo.recompute_old_logprobs: the learner's own logprobs before the update become
        old_logprobs; the sampler's move to sampler_logprobs (for TIS). Returns the mismatch
        metrics over the whole share, or None when old_logprobs stay the sampler's."""
        if not self.recompute_old_logprobs:
            return None
        num, den = 0.0, 0.0
        for shard in mini_batches:
            shard.sampler_logprobs = shard.old_logprobs
            shard.old_logprobs = self.logprobs(shard)
            num += float(((shard.sampler_logprobs - shard.old_logprobs) * shard.response_mask).sum())
            den += float(shard.response_mask.sum())
        self.engine.train()
        return {"sampler_kl": num / max(den, 1.0), "mismatch_tokens": den}

    def _accumulate(self, shard: TrainBatch, normalizer: float, measure_mismatch: bool) -> list[dict]:
        """Backward over the shard's micro-batches (gradients add up until engine.step())."""
        parts = []
        for _, mb in shard.micro_batches(self.micro_batch_size, by_prompt=self.share_prompts):
            mb = mb.to(self.engine.device)
            logprobs, entropy = response_logprobs(self.engine, mb, with_entropy=True,
                                                  entropy_grad=bool(self.loss_kwargs.get("entropy_coef")),
                                                  share_prompts=self.share_prompts, temperature=self.temperature)
            is_weights = None
            if self.tis != "none":
                is_weights = truncated_is_weights(mb.old_logprobs, mb.sampler_logprobs, mb.response_mask,
                                                  self.tis, self.tis_cap)
            loss, metrics = policy_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
                                        mb.response_mask, normalizer=normalizer, is_weights=is_weights,
                                        entropy=entropy, **self.loss_kwargs)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            metrics["entropy"] = masked_mean(entropy.detach(), mb.response_mask)
            if is_weights is not None:
                metrics["tis/weight_mean"] = masked_mean(is_weights, mb.response_mask)
                metrics["tis/frac_capped"] = masked_mean((is_weights >= self.tis_cap).float(), mb.response_mask)
            part = {**{k: float(v) for k, v in metrics.items()}, "loss": loss.item(),
                    "tokens": float(mb.response_mask.sum())}
            if measure_mismatch:  # k1 estimate of KL(sampler || learner) on the sampled tokens
                part["sampler_kl"] = float(masked_mean(mb.old_logprobs - logprobs.detach(), mb.response_mask))
            parts.append(part)
        return parts

    def _fold(self, parts: list[dict], norms: list[float], mismatch: dict | None) -> dict[str, float]:
        """One set of metrics for the update: token-weighted means over every micro-batch of every
        pass; loss, pg_loss and tokens per optimizer step (so ranks still add up)."""
        steps = len(norms)
        first = [p for p in parts if "sampler_kl" in p]
        out = combine_parts([{k: v for k, v in p.items() if k != "sampler_kl"} for p in parts])
        for k in SUMMED:
            out[k] /= steps
        if mismatch is not None:
            out["sampler_kl"] = mismatch["sampler_kl"]
        elif first:
            out["sampler_kl"] = combine_parts([{"sampler_kl": p["sampler_kl"], "tokens": p["tokens"]}
                                               for p in first])["sampler_kl"]
        out["grad_norm"] = sum(norms) / steps
        out["optimizer_steps"] = float(steps)
        return out

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current policy's logprobs [B, T] of the batch's responses (0 on padding)."""
        self.engine.eval()
        return batched_logprobs(self.engine.module, batch, self.micro_batch_size, self.share_prompts,
                                self.temperature)

    def _measure_reduced_grad_norm(self) -> None:
        """Record the norm of the gradient every rank steps with: ZeRO 0 reduces gradients across
        ranks inside step() (unmanaged accumulation) and reports no norm with a client fp32
        optimizer, so the norm is taken right after that all-reduce, before clipping. Stages 1-3
        reduce in their ZeRO optimizer, which reports the global norm itself."""
        if self.zero_stage != 0:
            return
        reduce = self.engine.allreduce_gradients

        def reduce_then_measure(*args, **kwargs):
            reduce(*args, **kwargs)
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._reduced_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

        self.engine.allreduce_gradients = reduce_then_measure

    def _grad_norm(self) -> float:
        """The global gradient norm of the optimizer step just taken (before clipping): the ZeRO
        or bf16 optimizer's own when it reports one, else the one measured after the all-reduce."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._reduced_norm
        self._reduced_norm = None
        return float("nan") if norm is None else float(norm)

    @contextlib.contextmanager
    def _full_parameters(self):
        """Whole parameters on every rank: ZeRO-3 partitions them, so all ranks must enter the
        gather together (the driver calls sync and save on every rank under ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def weight_buckets(self, dtype: str = "float32", bucket_mb: int = 256) -> list[WeightBucket]:
        """The current weights as buckets for the generators (rank 0's are the ones sent)."""
        target = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        with self._full_parameters():
            if self.rank != 0:
                return []
            return pack_state_dict(self.engine.module.state_dict().items(), bucket_mb << 20, target)

    def update_then_pack(self, mini_batches: list[TrainBatch], normalizers: list[float], epochs: int = 1,
                         dtype: str = "float32") -> tuple[dict[str, float], list[WeightBucket]]:
        """update() then weight_buckets() in one call: with Ray's num_returns=2 the driver queues
        the generators' weight load on the buckets right away, and they travel the moment the
        update ends, without a round trip through the driver (~8 ms a step at the tiny size)."""
        return self.update(mini_batches, normalizers, epochs), self.weight_buckets(dtype)

    def save_state(self, out_dir: str) -> None:
        """Weights, optimizer moments and LR schedule (DeepSpeed checkpoint; every rank writes its
        own ZeRO shard, so every rank must call this)."""
        self.engine.save_checkpoint(out_dir, tag="state", client_state={"version": self.version})

    def load_state(self, in_dir: str) -> int:
        """Restore save_state's checkpoint; returns the update count it was saved at."""
        path, client = self.engine.load_checkpoint(in_dir, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint 'state' in {in_dir}")
        self.version = int(client.get("version", 0))
        return self.version

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate from now on (KL rollback); returns the new current lr."""
        sched = self.scheduler
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        return float(self.optimizer.param_groups[0]["lr"])

    def save_pretrained(self, out_dir: str) -> None:
        with self._full_parameters():
            if self.rank == 0:
                self.engine.module.save_pretrained(out_dir)
