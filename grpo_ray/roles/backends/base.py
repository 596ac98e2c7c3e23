"""The learner's training backend: the engine side of an update, behind one interface.

The Learner (roles/learner.py) owns the algorithm: which micro-batches, the loss of each one
(core.algorithm.policy_loss over the global normaliser), truncated importance sampling, the
metrics. A backend owns everything that depends on how the weights are held and trained:
the process group, the wrapped model, the optimizer and its schedule, how gradients from several
ranks are combined, the gradient norm, gathering the full parameters, and checkpoints.

The contract that keeps the gradient independent of how a batch is split: the learner hands
backward() each micro-batch's loss already divided by the normaliser of its whole mini-batch
over all ranks; the backend makes the gradient applied by step() the SUM of those losses'
gradients over every micro-batch and every rank (no mean over ranks, no 1/accumulation-steps).

One implementation today, DeepSpeed (backends/deepspeed.py); a new one (FSDP2, ...) is one new
module with a TrainingBackend subclass and one line in backends.BACKENDS.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # the driver imports this module without torch's weight
    import torch


@dataclass(frozen=True)
class BackendSettings:
    """What every backend is given, whatever it is (backend-specific options come as keywords)."""
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0     # max global gradient norm (before the step)
    warmup_steps: int = 0      # linear LR warm-up over this many optimizer steps
    dtype: str = "float32"     # compute dtype: "float32" or "bfloat16" (master weights stay float32)
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


class TrainingBackend(abc.ABC):
    """One learner rank's engine. Life cycle: __init__ (joins the process group, builds the model
    and optimizer), then per optimizer step: backward() once per micro-batch, step() (which skips
    a non-finite step and says so), grad_norm(); full_parameters() for weight sync and
    save_pretrained; save_state/load_state for resumable checkpoints; scale_lr for the KL
    rollback."""

    @classmethod
    @abc.abstractmethod
    def full_params_need_all_ranks(cls, zero_stage: int = 0) -> bool:
        """Whether full_parameters() is collective (every rank must enter it together), so that
        the driver calls weight_buckets / save_pretrained on every rank, not only rank 0. Must
        not import the backend's framework: the driver calls it."""

    @abc.abstractmethod
    def __init__(self, build_model: Callable[[], torch.nn.Module], settings: BackendSettings, **options):
        """Join the process group of settings.world_size ranks, then build_model() (the policy in
        float32, dropout off) and wrap it with its optimizer (make_optimizer's AdamW and warm-up
        unless the backend has reason to differ). options: backend-specific (DeepSpeed: zero_stage);
        a backend raises ValueError on an option or value it cannot honour."""

    @property
    @abc.abstractmethod
    def model(self) -> torch.nn.Module:
        """What the loss forward runs through (it may be a wrapper, such as DeepSpeed's engine);
        next(model.parameters()).device is where the micro-batches go."""

    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The plain policy (a Hugging Face causal LM), for forwards without gradient."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the model's inputs go."""

    @abc.abstractmethod
    def train(self) -> None:
        """Training mode for the forwards that follow (dropout is off either way)."""

    @abc.abstractmethod
    def eval(self) -> None:
        """Evaluation mode for the forwards that follow."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Add d(loss)/d(weights) to the accumulated gradient. loss is one micro-batch's part of
        the global sum on this rank; after step() the gradient applied is the sum of every
        rank's parts (the backend undoes any mean over ranks or accumulation steps it does)."""

    @abc.abstractmethod
    def step(self, skip: bool = False) -> bool:
        """Combine the gradients across ranks, clip them to settings.grad_clip, step the
        optimizer and the LR schedule, and zero the gradients: one optimizer step. Returns True.

        The non-finite guard: when the combined gradient holds an inf or NaN, or `skip` (this
        rank's loss was not finite) is set on any rank, the step is skipped instead: the
        gradients are dropped and the weights, the optimizer state (moments, step count) and the
        LR schedule stay as they were; returns False, the same on every rank. A backend that
        cannot honour `skip` for a finite gradient documents it (DeepSpeed ZeRO-2/3, bf16)."""

    @abc.abstractmethod
    def grad_norm(self) -> float:
        """The global gradient norm of the step just taken, before clipping (nan if unknown; inf
        or nan after a skipped step)."""

    @abc.abstractmethod
    def full_parameters(self, trainable_only: bool = False) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """Context manager yielding the policy with whole (unsharded) parameters, on rank 0 at
        least; collective when full_params_need_all_ranks(). trainable_only: only the parameters
        that train need be whole (a LoRA adapter's sync and save: the frozen base stays sharded)."""

    @abc.abstractmethod
    def save_state(self, out_dir: str, client_state: dict) -> None:
        """Weights, optimizer moments and LR schedule into out_dir, with client_state (every rank
        calls it; each writes its own shard if the state is sharded)."""

    @abc.abstractmethod
    def load_state(self, in_dir: str) -> dict:
        """Restore save_state's checkpoint; returns its client_state. Raises FileNotFoundError
        when in_dir holds none."""

    @abc.abstractmethod
    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate from now on; returns the new current lr."""


def make_optimizer(model: torch.nn.Module, settings: BackendSettings):
    """The optimizer and LR schedule every backend uses: AdamW (betas 0.9, 0.99) and a linear
    warm-up. Adam's first updates move every weight by ~lr whatever the gradient's size, which on
    a sparse RL signal is a large, random step away from the reference. Returns (optimizer, scheduler)."""
    import torch

    # only what trains (a LoRA policy's adapter): ZeRO partitions the optimizer's parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.99))
    warmup = settings.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return optimizer, scheduler


def scale_lr(optimizer, scheduler, factor: float) -> float:
    """Multiply the learning rate from now on, in the schedule's base rates and in the optimizer's
    current ones; returns the new current lr."""
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
    return float(optimizer.param_groups[0]["lr"])


def all_finite(tensors) -> bool:
    """Whether every value of every tensor is finite (one device sync for the lot)."""
    import torch

    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


@contextlib.contextmanager
def unsharded(module) -> Iterator:
    """full_parameters() for a backend whose parameters are always whole."""
    yield module
