"""Issue 22: the learner's training backend interface (roles/backends) and a Learner that leaves
the batches it is handed as they are. Fast: a plain-torch backend for one rank stands in for
DeepSpeed, in-process."""
import math
import subprocess
import sys

import pytest
import torch

from grpo_ray.core.algorithm import loss_normalizer
from grpo_ray.roles import backends
from grpo_ray.roles.backends.base import TrainingBackend, all_finite, make_optimizer, scale_lr, unsharded
from test_learner_options import _batch


class PlainTorchBackend(TrainingBackend):
    """World size 1, no wrapper: what the interface asks of a backend, and nothing more."""

    @classmethod
    def full_params_need_all_ranks(cls, zero_stage: int = 0) -> bool:
        return False

    def __init__(self, build_model, settings, zero_stage: int = 0):
        if settings.world_size != 1 or zero_stage != 0:
            raise ValueError("one rank, no ZeRO")
        self._model = build_model()
        self.optimizer, self.scheduler = make_optimizer(self._model, settings)
        self.grad_clip, self._norm = settings.grad_clip, float("nan")

    model = property(lambda self: self._model)
    module = property(lambda self: self._model)
    device = property(lambda self: torch.device("cpu"))

    def train(self):
        self._model.train()

    def eval(self):
        self._model.eval()

    def backward(self, loss):
        loss.backward()

    def step(self, skip=False):
        grads = [p.grad for p in self._model.parameters() if p.grad is not None]
        if skip or not all_finite(grads):  # the non-finite guard: drop the gradients, step nothing
            self.optimizer.zero_grad()
            self._norm = float("inf")
            return False
        self._norm = float(torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return True

    def grad_norm(self):
        return self._norm

    def full_parameters(self, trainable_only=False):
        return unsharded(self._model)

    def save_state(self, out_dir, client_state):
        torch.save({"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client": client_state}, f"{out_dir}/state.pt")

    def load_state(self, in_dir):
        state = torch.load(f"{in_dir}/state.pt")
        self._model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]

    def scale_lr(self, factor):
        return scale_lr(self.optimizer, self.scheduler, factor)


@pytest.fixture
def plain_learner(monkeypatch, tiny_model_dir):
    from grpo_ray.roles.learner import Learner

    monkeypatch.setitem(backends.BACKENDS, "plain", "test_learner_backend:PlainTorchBackend")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    loss = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean")
    yield lambda **kw: Learner(tiny_model_dir, lr=1e-2, loss_kwargs=loss, micro_batch_size=8, backend="plain", **kw)
    torch.set_num_threads(threads)  # Learner sets the process's torch threads and seed
    torch.set_rng_state(rng)


def _fields(b):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()}


def _same(b, saved):
    return vars(b).keys() == saved.keys() and all(
        torch.equal(v, saved[k]) if isinstance(v, torch.Tensor) else v == saved[k] for k, v in vars(b).items())


@pytest.mark.parametrize("recompute", [True, False])
def test_update_leaves_the_batch_it_was_handed_unchanged(plain_learner, recompute):
    learner = plain_learner(recompute_old_logprobs=recompute, tis="token" if recompute else "none", tis_cap=1.5)
    b = _batch(seed=2)
    own = learner.logprobs(b)
    shift = torch.where(torch.rand(own.shape, generator=torch.Generator().manual_seed(3)) < 0.5, -0.7, 0.3)
    b.old_logprobs = (own + shift) * b.response_mask  # the sampler differs from the learner
    halves = [b.select(slice(0, 8)), b.select(slice(8, 16))]
    saved = [_fields(x) for x in [b, *halves]]
    old_tensor = halves[0].old_logprobs
    stats = learner.update(halves, [loss_normalizer(h.response_mask, "seq_mean") for h in halves], 2)
    assert all(_same(x, s) for x, s in zip([b, *halves], saved))
    assert halves[0].old_logprobs is old_tensor and halves[0].sampler_logprobs is None
    assert stats["optimizer_steps"] == 4.0 and stats["grad_norm"] > 0
    mask = b.response_mask.bool()
    if recompute:  # the update did use the recomputed logprobs, on its own copies
        assert stats["sampler_kl"] == pytest.approx(float(shift[mask].mean()), abs=1e-4)
        assert 0 < stats["tis/weight_mean"] < 1.5
    else:
        assert "tis/weight_mean" not in stats


def test_learner_methods_through_the_backend(plain_learner, tmp_path):
    learner = plain_learner()
    b = _batch(seed=5)
    b.old_logprobs = learner.logprobs(b)
    learner.save_state(str(tmp_path))
    before = learner.weight_buckets()
    stats, buckets = learner.update_then_pack([b], [loss_normalizer(b.response_mask, "seq_mean")])
    assert learner.updates == 1 and math.isfinite(stats["loss"]) and len(buckets) == len(before)
    assert learner.load_state(str(tmp_path)) == 0
    assert learner.scale_lr(0.5) == pytest.approx(5e-3)
    learner.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").exists()


def test_registry_and_full_params_without_importing_deepspeed():
    code = ("import sys\n"
            "from grpo_ray.roles.backends import full_params_need_all_ranks as f, get_backend\n"
            "assert [f('deepspeed', z) for z in range(4)] == [False, False, False, True]\n"
            "assert not get_backend('deepspeed').__abstractmethods__\n"
            "assert 'deepspeed' not in sys.modules, 'imported deepspeed'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ValueError, match="unknown learner backend"):
        backends.get_backend("fsdp3")
