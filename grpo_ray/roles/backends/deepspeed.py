"""DeepSpeed training backend: one engine per learner rank; M ranks (one Ray actor each) form one
gloo/NCCL process group. ZeRO stage 0-3 (learner.zero_stage), bf16 through DeepSpeed's bf16
optimizer over float32 master weights.

Non-finite guard (step() returns False on a skipped step), per configuration, DeepSpeed 0.19:
- ZeRO-0 float32 (the default): the engine hands the client AdamW the gradient as it is, so an
  inf/NaN would reach the weights. This backend checks first: every local gradient finite and the
  learner's `skip` unset, a max over the ranks (one all-reduce of a flag), before the engine's
  all-reduce; else it drops the gradients (engine.zero_grad) and neither the engine, the
  optimizer nor the LR schedule steps.
- ZeRO-1/2 (float32 or bf16), ZeRO-3, ZeRO-0 bf16: DeepSpeed's own optimizer (ZeRO, BF16_Optimizer)
  computes the global norm of the combined gradient, and a non-finite one is an overflow: it drops
  the gradients and skips the optimizer and LR-schedule step (engine.skipped_steps counts them);
  step() reads that flag. The gradients have left the parameters by then (ZeRO-2/3 partition them
  during backward), so the learner's `skip` for a non-finite loss whose gradient is finite is not
  honoured here: that step is taken (a NaN/inf in the loss reaches its gradient in practice,
  e.g. a NaN advantage).

Split invariance, DeepSpeed's part: DeepSpeed's own 1/GAS scaling is off (unmanaged
accumulation, backward(scale_wrt_gas=False), step() is the boundary), and the loss is multiplied
by the world size because DeepSpeed averages gradients across ranks. With the learner dividing
every micro-batch by its mini-batch's global normaliser, the sum over all micro-batches and
ranks is then exactly the full-batch loss, so the gradient does not depend on how the batch was
split.

`deepspeed` itself is imported only when a backend is built (after DS_ACCELERATOR is set), so the
driver can import this module to ask full_params_need_all_ranks.
"""
from __future__ import annotations

import contextlib
import io
import os

import torch

from ...models.cache import torch_extensions_dir
from .base import BackendSettings, TrainingBackend, all_finite, make_optimizer, scale_lr


class DeepSpeedBackend(TrainingBackend):
    @classmethod
    def full_params_need_all_ranks(cls, zero_stage: int = 0) -> bool:
        """ZeRO-3 partitions the parameters: all ranks gather them together."""
        return zero_stage == 3

    def __init__(self, build_model, settings: BackendSettings, zero_stage: int = 0):
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
        s = settings
        for key, value in {"MASTER_ADDR": s.master_addr, "MASTER_PORT": str(s.master_port), "RANK": str(s.rank),
                           "LOCAL_RANK": "0", "WORLD_SIZE": str(s.world_size)}.items():
            os.environ[key] = value
        if not torch.cuda.is_available():  # else DeepSpeed probes every accelerator it knows
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # its JIT-built ops in a folder of this Python environment's own (models/cache.py), unless
        # the user chose one
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
        import deepspeed

        # on CPU it loads its shared-memory op and prints that it was "built successfully" (it was
        # cached), a line Ray forwards late, after the run's last one
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        self.world_size, self.zero_stage = s.world_size, zero_stage
        model = build_model()  # fp32 master weights; bf16 via DeepSpeed
        # A client AdamW skips DeepSpeed's ~40 s fused_adam JIT build on CPU.
        optimizer, scheduler = make_optimizer(model, s)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": s.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self._reduced_norm: float | None = None
        self._measure_reduced_grad_norm()
        # the one configuration whose optimizer would step with a non-finite gradient
        self._check_before_step = zero_stage == 0 and s.dtype == "float32"

    @property
    def model(self) -> torch.nn.Module:
        return self.engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, skip: bool = False) -> bool:
        """One optimizer step, or none when the gradient is not finite (see the module's notes)."""
        if self._check_before_step:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if self._on_any_rank(skip or not all_finite(grads)):
                self.engine.zero_grad()  # what the engine does after a ZeRO-0 step
                self.engine.skipped_steps += 1
                if hasattr(self.engine, "_unmanaged_backward_count"):  # samples counted at the next step
                    self.engine._unmanaged_backward_count = 0
                self._reduced_norm = float("inf")  # as DeepSpeed reports an overflow
                return False
        self.engine.step()
        return not getattr(self.engine.optimizer, "overflow", False)

    def _on_any_rank(self, flag: bool) -> bool:
        """flag or'ed over the ranks (so that every rank skips the same steps)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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

    def grad_norm(self) -> float:
        """The ZeRO or bf16 optimizer's own norm when it reports one, else the one measured after
        the all-reduce."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._reduced_norm
        self._reduced_norm = None
        return float("nan") if norm is None else float(norm)

    @contextlib.contextmanager
    def full_parameters(self, trainable_only: bool = False):
        """ZeRO-3 partitions the parameters, so all ranks must enter the gather together (the
        driver calls sync and save on every rank under ZeRO-3); trainable_only gathers a LoRA
        adapter alone, not the frozen base beside it."""
        if self.zero_stage == 3:
            import deepspeed

            params = [p for p in self.engine.module.parameters() if p.requires_grad or not trainable_only]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield self.engine.module
        else:
            yield self.engine.module

    def save_state(self, out_dir: str, client_state: dict) -> None:
        """A DeepSpeed checkpoint, tag "state" (every rank writes its own ZeRO shard)."""
        self.engine.save_checkpoint(out_dir, tag="state", client_state=client_state)

    def load_state(self, in_dir: str) -> dict:
        path, client = self.engine.load_checkpoint(in_dir, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint 'state' in {in_dir}")
        return client or {}

    def scale_lr(self, factor: float) -> float:
        return scale_lr(self.optimizer, self.scheduler, factor)
