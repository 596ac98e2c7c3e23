"""Learner role: a DeepSpeed engine that computes the GRPO loss over micro-batches and steps the
optimizer once per rollout batch. World size 1 by default; M ranks (one Ray actor each) form one
gloo/NCCL process group and each takes 1/M of the batch.

Split invariance: every micro-batch on every rank divides by the same global normaliser
(algorithm.loss_normalizer over the whole step's batch), DeepSpeed's own 1/GAS scaling is off
(unmanaged accumulation, step() is the boundary), and the loss is multiplied by the world size
because DeepSpeed averages gradients across ranks. The sum over all micro-batches and ranks is
then exactly the full-batch loss, so the gradient does not depend on how the batch was split.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .algorithm import masked_mean, policy_loss
from .metrics import combine_parts
from .modeling import batched_logprobs, load_causal_lm, response_logprobs
from .records import TrainBatch
from .weight_sync import WeightBucket, pack_state_dict


class Learner:
    def __init__(self, model_path: str, *, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 zero_stage: int = 0, warmup_steps: int = 0, dtype: str = "float32", loss_kwargs: dict | None = None,
                 micro_batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, threads: int = 2, seed: int = 0):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        for key, value in {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}.items():
            os.environ[key] = value
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                                   verbose=False)
        self.rank, self.world_size = rank, world_size
        self.loss_kwargs = dict(loss_kwargs or {})
        self.micro_batch_size = micro_batch_size
        model = load_causal_lm(model_path, "float32")  # fp32 master weights; bf16 via DeepSpeed
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
        self.version = 0

    def update(self, batch: TrainBatch, normalizer: float) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch. Returns token-weighted metrics."""
        self.engine.train()
        parts = []
        for mb in batch.micro_batches(self.micro_batch_size):
            logprobs, entropy = response_logprobs(self.engine, mb, with_entropy=True)
            loss, metrics = policy_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
                                        mb.response_mask, normalizer=normalizer, **self.loss_kwargs)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            metrics["entropy"] = masked_mean(entropy, mb.response_mask)
            metrics["sampler_kl"] = masked_mean(  # k1 estimate of the sampler/learner mismatch
                (mb.old_logprobs - logprobs.detach()), mb.response_mask)
            parts.append({**{k: float(v) for k, v in metrics.items()}, "loss": loss.item(),
                          "tokens": float(mb.response_mask.sum())})
        grad_norm = self._grad_norm_before_step()
        self.engine.step()
        self.version += 1
        out = combine_parts(parts)
        norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        out["grad_norm"] = float(norm) if norm is not None else float("nan")
        return out

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current policy's logprobs [B, T] of the batch's responses (0 on padding)."""
        self.engine.eval()
        return batched_logprobs(self.engine.module, batch, self.micro_batch_size)

    def _grad_norm_before_step(self) -> float | None:
        """ZeRO 0/1 keep full gradients on the parameters, and DeepSpeed reports no norm there
        with a client optimizer; stages 2/3 partition gradients and DeepSpeed reports it."""
        if self.zero_stage >= 2:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        if self.world_size > 1:  # reduced only inside step(); this is the local shard's norm
            return None
        return float(torch.nn.utils.get_total_norm(grads))

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

    def save_pretrained(self, out_dir: str) -> None:
        with self._full_parameters():
            if self.rank == 0:
                self.engine.module.save_pretrained(out_dir)
