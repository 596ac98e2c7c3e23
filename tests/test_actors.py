"""Real Ray actors around real vLLM and DeepSpeed engines (slow: engines start in ~15-30 s)."""
import time

import pytest
import torch

from grpo_ray.core.algorithm import loss_normalizer
from grpo_ray.core.records import TrainBatch

pytestmark = pytest.mark.slow

PROMPTS = [f"Q: {a}+{b}=?\nA:" for a, b in [(1, 2), (13, 29), (40, 7), (25, 25)]]
LOSS = dict(eps_low=0.2, eps_high=0.2, beta=0.001, aggregation="seq_mean")


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model_dir):
    from grpo_ray.roles.generator import Generator
    from grpo_ray.roles.learner import Learner
    from grpo_ray.roles.reference import Reference

    ray = ray_local
    gen = ray.remote(Generator).options(num_cpus=0.25).remote(tiny_model_dir, cpu_threads="0-1", seed=0)
    learner = ray.remote(Learner).options(num_cpus=0.25).remote(tiny_model_dir, lr=1e-2, loss_kwargs=LOSS,
                                                                micro_batch_size=16, master_port=29611)
    ref = ray.remote(Reference).options(num_cpus=0.25).remote(tiny_model_dir, micro_batch_size=16)
    ray.get([gen.ready.remote(), learner.__ray_ready__.remote(), ref.__ray_ready__.remote()])
    yield ray, gen, learner, ref
    for a in (gen, learner, ref):
        ray.kill(a)


def _batch(rollout, advantages=None):
    adv = torch.randn(len(rollout), generator=torch.Generator().manual_seed(0)) if advantages is None else advantages
    return TrainBatch.from_rollout(rollout, adv, pad_id=0)


def _max_diff(a, b, mask):
    return float(((a - b).abs() * mask).max())


def test_generator_returns_groups_with_sampler_logprobs(engines):
    ray, gen, learner, ref = engines
    ro = ray.get(gen.generate.remote(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=1))
    assert len(ro) == 16 and ro.prompt_ids[0] == ro.prompt_ids[3] != ro.prompt_ids[4]
    assert all(len(lp) == len(ids) > 0 for lp, ids in zip(ro.old_logprobs, ro.response_ids))
    assert all(x <= 0 for lp in ro.old_logprobs for x in lp)
    assert len(set(map(tuple, ro.response_ids[:4]))) > 1  # a group's samples differ (distinct seeds)
    again = ray.get(gen.generate.remote(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=1))
    assert again.response_ids == ro.response_ids  # and are reproducible
    # prompt j's completions sample with seeds seed + j*n + k, whatever else is in the call: a
    # step split over generators, or sampled again after a generator restart, draws the same
    part = ray.get(gen.generate.remote(PROMPTS[1:3], n=4, temperature=1.0, max_new_tokens=8, seed=1 + 4))
    assert part.response_ids == ro.response_ids[4:12]
    # before any update, generator, learner and reference agree on the sampled tokens' logprobs
    b = _batch(ro)
    assert _max_diff(ray.get(learner.logprobs.remote(b)), b.old_logprobs, b.response_mask) < 1e-4
    assert _max_diff(ray.get(ref.logprobs.remote(b)), b.old_logprobs, b.response_mask) < 1e-4


def test_prompts_past_the_step_token_budget_sample_and_keep_their_seeds(engines):
    # 8 prompts x 16 samples x ~350 tokens is ~45k prompt tokens, past vLLM's 4096 a step: with
    # chunked prefill vLLM split a prompt and rewound its row's CPU generator, which raised
    # "CPU Generator does not use offset" on every such step
    ray, gen, _, _ = engines
    prompts = ["Q: " + " ".join(f"{i + j}+{i}" for i in range(60)) + "=?\nA:" for j in range(8)]
    ro = ray.get(gen.generate.remote(prompts, n=16, temperature=1.0, max_new_tokens=4, seed=7))
    assert len(ro) == 128 and len(ro.prompt_ids[0]) > 300
    part = ray.get(gen.generate.remote(prompts[5:7], n=16, temperature=1.0, max_new_tokens=4, seed=7 + 5 * 16))
    assert part.response_ids == ro.response_ids[80:112]  # the same streams, however the steps were cut


def test_at_another_temperature_all_three_roles_give_the_tempered_policys_logprobs(engines, tiny_model_dir):
    # the policy that samples at T is softmax(logits / T): vLLM's reported logprobs, the
    # learner's and the reference's must all be of it, or the ratio is off from the first step
    from grpo_ray.roles.learner import Learner
    from grpo_ray.roles.reference import Reference

    ray, gen, learner, ref = engines
    ro = ray.get(gen.generate.remote(PROMPTS, n=4, temperature=0.5, max_new_tokens=8, seed=3))
    b = _batch(ro)
    hot = ray.remote(Learner).options(num_cpus=0.25).remote(tiny_model_dir, lr=1e-2, loss_kwargs=LOSS,
                                                            micro_batch_size=16, master_port=29612, temperature=0.5)
    try:
        assert _max_diff(ray.get(hot.logprobs.remote(b)), b.old_logprobs, b.response_mask) < 1e-4
    finally:
        ray.kill(hot)
    assert _max_diff(Reference(tiny_model_dir, temperature=0.5).logprobs(b), b.old_logprobs, b.response_mask) < 1e-4
    # the T = 1 learner's logprobs are another policy's: this check can tell them apart
    assert _max_diff(ray.get(learner.logprobs.remote(b)), b.old_logprobs, b.response_mask) > 0.05


def test_after_sync_generator_samples_from_the_learners_weights(engines):
    ray, gen, learner, ref = engines
    ro = ray.get(gen.generate.remote(PROMPTS, n=8, temperature=1.0, max_new_tokens=8, seed=2))
    b = _batch(ro)
    b.ref_logprobs = ray.get(ref.logprobs.remote(b))
    stats = ray.get(learner.update.remote([b], [loss_normalizer(b.response_mask, "seq_mean")]))
    assert stats["grad_norm"] > 0 and stats["tokens"] == float(b.response_mask.sum())
    # the update moved the policy: the generator's (stale) logprobs no longer match the learner
    stale = _max_diff(ray.get(learner.logprobs.remote(b)), b.old_logprobs, b.response_mask)
    assert stale > 1e-2
    # the load is queued, not awaited (as the loop does): the next rollout waits behind it, and says how long
    loading = gen.update_weights.remote(learner.weight_buckets.remote(), 1)
    ro2 = ray.get(gen.generate.remote(PROMPTS, n=8, temperature=1.0, max_new_tokens=8, seed=3, sent=time.time()))
    assert ray.get(loading) >= 20
    assert ro2.weight_version == 1 and ro2.queued_s > 0.005
    # the best of 3 small calls on an idle engine: one stalled call on a busy machine is not the cost
    idle = [ray.get(gen.generate.remote(PROMPTS[:1], n=1, temperature=1.0, max_new_tokens=2, sent=time.time()))
            for _ in range(3)]
    assert 0 <= min(r.queued_s for r in idle) < ro2.queued_s
    # sample_s is the sampling alone, not the wait before it: 32 completions of 8 tokens vs 1 of 2
    assert 0 < min(r.sample_s for r in idle) < ro2.sample_s
    b2 = _batch(ro2)
    assert _max_diff(ray.get(learner.logprobs.remote(b2)), b2.old_logprobs, b2.response_mask) < 1e-4
    # the reference stays frozen at the initial policy
    assert _max_diff(ray.get(ref.logprobs.remote(b2)), b2.old_logprobs, b2.response_mask) > 1e-2


def test_reference_pass_queued_behind_sampling_matches_the_drivers_batch(engines):
    """The driver hands the reference the generators' refs before they finish: Ray runs the pass
    once the parts exist, in the layout the driver builds, whatever is masked after."""
    from grpo_ray.core.records import Rollout

    ray, gen, learner, ref = engines
    kw = dict(n=4, temperature=1.0, max_new_tokens=8)
    parts = [gen.generate.remote(PROMPTS[:3], seed=4, **kw), gen.generate.remote(PROMPTS[3:], seed=5, **kw)]
    queued = ref.rollout_logprobs.remote(0, *parts)  # pad_id 0, as _batch
    b = _batch(Rollout.concat(ray.get(parts)))
    b.response_mask[::3] = 0.0  # as overlong masking does, after the pass was queued
    direct = ray.get(ref.logprobs.remote(b))
    got = ray.get(queued) * b.response_mask
    assert got.shape == direct.shape and bool((direct != 0).any())
    assert float((got - direct).abs().max()) < 1e-5


def test_a_step_larger_than_the_kv_cache_is_a_clear_error(ray_local, tiny_model_dir):
    """vLLM's CPU sampler crashes on preempted seeded requests deep inside the engine; the
    generator refuses such a step up front and says what to set."""
    from grpo_ray.roles.generator import Generator

    ray = ray_local
    gen = ray.remote(Generator).options(num_cpus=0.25).remote(tiny_model_dir, cpu_threads="0-1", kv_cache_mb=16)
    with pytest.raises(ValueError, match=r"rollout.kv_cache_mb=16 holds \d+ tokens .* set rollout.kv_cache_mb to "
                                         r"at least \d+"):
        ray.get(gen.generate.remote(PROMPTS, n=64, temperature=1.0, max_new_tokens=200, seed=0))
    ok = ray.get(gen.generate.remote(PROMPTS[:1], n=4, temperature=1.0, max_new_tokens=16, seed=0))
    assert len(ok) == 4  # a step that fits still runs on the same engine
    ray.kill(gen)
