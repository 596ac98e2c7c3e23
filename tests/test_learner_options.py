"""Issue 7's learner switches on a real DeepSpeed engine in a Ray actor (slow): several optimizer
steps per rollout make clipping act, recomputed old logprobs with truncated importance sampling,
and the entropy bonus."""
import math

import pytest
import torch

from grpo_ray.core.algorithm import loss_normalizer
from grpo_ray.core.records import Rollout, TrainBatch

pytestmark = pytest.mark.slow
PORTS = iter(range(29631, 29700))


def _learner(ray, model_dir, **kw):
    from grpo_ray.roles.actors import ACTOR_ENV
    from grpo_ray.roles.learner import Learner

    loss = dict(eps_low=kw.pop("eps", 0.2), eps_high=kw.pop("eps_high", 0.2), beta=0.0, aggregation="seq_mean",
                entropy_coef=kw.pop("entropy_coef", 0.0))
    actor = ray.remote(Learner).options(num_cpus=0.25, runtime_env={"env_vars": {**ACTOR_ENV, "DS_ACCELERATOR": "cpu"}})
    return actor.remote(model_dir, lr=kw.pop("lr", 1e-2), loss_kwargs=loss, micro_batch_size=8,
                        master_port=next(PORTS), warmup_steps=0, **kw)


def _batch(seed=0, rows=16, advantages=None):
    """Random prompts and responses over the tiny vocabulary (ids 3..250)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (4,), generator=g).tolist() for _ in range(rows)]
    lengths = torch.randint(3, 9, (rows,), generator=g)
    responses = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in lengths]
    ro = Rollout(prompts, responses, [[0.0] * len(r) for r in responses], [""] * rows, [False] * rows)
    adv = torch.randn(rows, generator=g) if advantages is None else advantages
    return TrainBatch.from_rollout(ro, adv, pad_id=0)


def _halves(b):
    """Two mini-batches and their normalisers."""
    mbs = [b.select(slice(0, b.size // 2)), b.select(slice(b.size // 2, b.size))]
    return mbs, [loss_normalizer(m.response_mask, "seq_mean") for m in mbs]


def test_more_optimizer_steps_per_rollout_make_clipping_act(ray_local, tiny_model_dir):
    ray = ray_local
    learner = _learner(ray, tiny_model_dir, eps=1e-3, eps_high=1e-3)
    b = _batch()
    b.old_logprobs = ray.get(learner.logprobs.remote(b))  # on-policy: the sampler's == the learner's
    one = ray.get(learner.update.remote([b], [loss_normalizer(b.response_mask, "seq_mean")], 1))
    assert one["optimizer_steps"] == 1.0
    assert one["clip/low"] + one["clip/high"] == 0.0  # one step on fresh samples: ratio 1 everywhere
    b = _batch(seed=1)
    b.old_logprobs = ray.get(learner.logprobs.remote(b))
    mbs, norms = _halves(b)
    many = ray.get(learner.update.remote(mbs, norms, 2))  # 2 mini-batches x 2 epochs
    assert many["optimizer_steps"] == 4.0
    assert many["clip/low"] + many["clip/high"] > 0.05  # old_logprobs kept: later steps see ratio != 1
    assert many["tokens"] == pytest.approx(float(b.response_mask.sum()) / 2)  # per optimizer step
    # the parity guard's rows: mini-batch 0's (measured before the first step), each once, ~0 on-policy
    rows = many["sampler_kl/rows"]
    assert sorted((j, i) for j, i, _, _ in rows) == [(0, i) for i in range(mbs[0].size)]
    assert sum(n for *_, n in rows) == float(mbs[0].response_mask.sum()) and all(abs(s) < 1e-4 for _, _, s, _ in rows)
    ray.kill(learner)


def test_recomputed_old_logprobs_and_truncated_importance_sampling(ray_local, tiny_model_dir):
    ray = ray_local
    learner = _learner(ray, tiny_model_dir, recompute_old_logprobs=True, tis="token", tis_cap=1.5)
    b = _batch(seed=2)
    own = ray.get(learner.logprobs.remote(b))
    g = torch.Generator().manual_seed(3)
    shift = torch.where(torch.rand(own.shape, generator=g) < 0.5, -0.7, 0.3)  # sampler differs from the learner
    b.old_logprobs = (own + shift) * b.response_mask  # what vLLM "reported"
    stats = ray.get(learner.update.remote([b], [loss_normalizer(b.response_mask, "seq_mean")], 1))
    mask = b.response_mask.bool()
    assert stats["sampler_kl"] == pytest.approx(float(shift[mask].mean()), abs=1e-4)
    # per row (the parity guard's): each row's summed shift and its tokens, adding up to sampler_kl
    rows = sorted(stats["sampler_kl/rows"])
    assert [(j, i) for j, i, _, _ in rows] == [(0, i) for i in range(b.size)]
    assert [s for *_, s, _ in rows] == pytest.approx((shift * b.response_mask).sum(dim=1).tolist(), abs=1e-4)
    assert [n for *_, n in rows] == b.response_mask.sum(dim=1).tolist()
    # token weights min(exp(old - sampler), 1.5) = min(exp(-shift), 1.5): exp(0.7)=2.01 -> 1.5, exp(-0.3)=0.74
    expected = torch.clamp(torch.exp(-shift[mask]), max=1.5)
    assert stats["tis/weight_mean"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert stats["tis/frac_capped"] == pytest.approx(float((shift[mask] < 0).float().mean()), abs=1e-6)
    assert stats["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # ratio against the recomputed logprobs
    ray.kill(learner)


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_entropy_bonus_raises_entropy(ray_local, tiny_model_dir, coef):
    ray = ray_local
    learner = _learner(ray, tiny_model_dir, entropy_coef=coef, lr=3e-3)
    b = _batch(seed=4, advantages=torch.zeros(16))  # no policy-gradient signal, no KL (beta 0)
    b.old_logprobs = ray.get(learner.logprobs.remote(b))
    norm = [loss_normalizer(b.response_mask, "seq_mean")]
    before = ray.get(learner.update.remote([b], norm, 1))["entropy"]  # measured before the step
    after = ray.get(learner.update.remote([b], norm, 1))["entropy"]
    if coef:
        assert after > before + 1e-3
    else:
        assert math.isclose(after, before, rel_tol=1e-6)  # zero gradient: nothing moves
    ray.kill(learner)
