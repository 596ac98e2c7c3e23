"""Hand-computed checks of every function in grpo_ray/core/algorithm.py."""
import math

import pytest
import torch

from grpo_ray.core.algorithm import (aggregate, entropy_from_logits, group_advantages, informative_groups, kl_k3,
                                loss_normalizer, masked_mean, overlong_penalty, policy_loss, token_logprobs,
                                truncated_is_weights)


def test_guide_example_advantages():
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), group_size=4)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-6)


def test_equal_rewards_give_zero_advantages_and_groups_are_independent():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0]), group_size=4)
    assert torch.equal(adv[:4], torch.zeros(4))
    # second group: mean 0.75, population std sqrt(27/16)
    std = math.sqrt(((0.75 ** 2) * 3 + 2.25 ** 2) / 4)
    expected = torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (std + 1e-8)
    assert torch.allclose(adv[4:], expected, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_that_float32_cannot_hold_give_zero_advantages(estimator):
    # a group all rewarded 0.1 (a format bonus on all-wrong answers): in float32 the mean of G
    # copies of 0.1 is not 0.1, and (r - mean) / (std + 1e-8) came out as -0.43 for every member
    for value in (0.1, 0.2, 0.3, 0.7, 0.9, 1 / 3):
        for G in (2, 3, 5, 8, 16):
            adv = group_advantages(torch.full((2 * G,), value), G, estimator=estimator)
            assert torch.equal(adv, torch.zeros(2 * G)), (value, G)
    # a group that differs by any amount is still normalised: one member 1e-4 above the others
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.1 + 1e-4]), 4)
    assert torch.allclose(adv, torch.tensor([-1 / 3 ** 0.5] * 3 + [3 ** 0.5]), atol=1e-3)


def test_population_not_sample_std():
    adv = group_advantages(torch.tensor([0.0, 2.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0]))  # sample std would give +-0.707


def test_dr_grpo_and_rloo_estimators():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.allclose(group_advantages(r, 4, estimator="dr_grpo"), torch.tensor([-0.5, 0.5, 0.5, -0.5]))
    # leave-one-out: r_i - mean of the other three
    assert torch.allclose(group_advantages(r, 4, estimator="rloo"), torch.tensor([-2 / 3, 2 / 3, 2 / 3, -2 / 3]))


def test_group_advantages_rejects_bad_shapes_and_estimators():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(4), 4, estimator="ppo")


def test_kl_k3_hand_value_and_zero_at_equality():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([0.5 + math.log(2) - 1]))
    assert torch.equal(kl_k3(ref, ref), torch.zeros(1))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_k3_expectation_equals_exact_kl_on_toy_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])   # policy (samples come from here)
    q = torch.tensor([0.2, 0.5, 0.3])   # reference
    exact = float((p * (p / q).log()).sum())
    expectation = float((p * kl_k3(p.log(), q.log())).sum())
    assert expectation == pytest.approx(exact, abs=1e-7)
    # and by Monte Carlo from the policy's samples
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    mc = float(kl_k3(p.log()[x], q.log()[x]).mean())
    assert mc == pytest.approx(exact, rel=0.02)


def _loss_and_grad(logp_val, old_val, adv, **kw):
    logp = torch.tensor([[logp_val]], requires_grad=True)
    loss, m = policy_loss(logp, torch.tensor([[old_val]]), None, torch.tensor([adv]), torch.ones(1, 1),
                          beta=0.0, **kw)
    loss.backward()
    return loss.item(), float(logp.grad), m


def test_unclipped_token_loss_and_gradient():
    loss, grad, m = _loss_and_grad(math.log(0.6), math.log(0.5), 1.0, eps_low=0.5, eps_high=0.5)
    assert loss == pytest.approx(-1.2) and grad == pytest.approx(-1.2)  # d(-r*A)/dlogp = -r*A
    assert float(m["clip/high"]) == 0.0


def test_clipped_token_has_zero_gradient():
    loss, grad, m = _loss_and_grad(math.log(0.6), math.log(0.5), 1.0, eps_low=0.1, eps_high=0.1)
    assert loss == pytest.approx(-1.1) and grad == 0.0
    assert float(m["clip/high"]) == 1.0 and float(m["clip/low"]) == 0.0
    loss, grad, m = _loss_and_grad(math.log(0.25), math.log(0.5), -1.0, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx(0.8) and grad == 0.0  # ratio 0.5 < 0.8 with A < 0: clipped
    assert float(m["clip/low"]) == 1.0


def test_clip_higher_is_asymmetric():
    # ratio 1.25: inside [1-0.2, 1+0.28] (DAPO clip-higher) but outside a symmetric 0.2
    _, grad, _ = _loss_and_grad(math.log(0.625), math.log(0.5), 1.0, eps_low=0.2, eps_high=0.28)
    assert grad == pytest.approx(-1.25)
    _, grad, _ = _loss_and_grad(math.log(0.625), math.log(0.5), 1.0, eps_low=0.2, eps_high=0.2)
    assert grad == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    loss, grad, _ = _loss_and_grad(math.log(0.5), math.log(0.1), -1.0, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx(5.0)  # ratio 5, A=-1: unbounded without dual clip
    loss, grad, m = _loss_and_grad(math.log(0.5), math.log(0.1), -1.0, eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    assert float(m["clip/dual"]) == 1.0 and float(m["clip/low"]) == 0.0  # counted: it gets no gradient
    _, _, m = _loss_and_grad(math.log(0.25), math.log(0.1), -1.0, eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0)
    assert float(m["clip/dual"]) == 0.0  # ratio 2.5 < 3


def test_recomputed_old_logprobs_make_ratio_one_and_clipping_dead():
    """The guide's pseudo-code bug: old == new at update time means clipping never acts."""
    logp = torch.randn(4, 5) - 2
    _, m = policy_loss(logp, logp.clone(), None, torch.randn(4), torch.ones(4, 5),
                       eps_low=1e-3, eps_high=1e-3, beta=0.0)
    assert float(m["clip/low"]) == 0.0 and float(m["clip/high"]) == 0.0 and float(m["ratio/mean"]) == 1.0
    assert "kl" not in m  # no reference logprobs: no KL measured (a 0 would read as "no drift")
    _, m = policy_loss(logp + 0.5, logp, None, torch.ones(4), torch.ones(4, 5), eps_low=0.2, eps_high=0.2, beta=0.0)
    assert float(m["clip/high"]) == 1.0  # with the sampler's logprobs, clipping does act


def test_kl_term_in_loss_and_its_gradient():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    loss, m = policy_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 1), eps_low=0.2, eps_high=0.2,
                          beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    assert float(m["kl"]) == pytest.approx(0.5 + math.log(2) - 1)
    assert float(logp.grad) == pytest.approx(0.1 * (1 - 0.5))  # d k3/d logp = 1 - exp(ref - logp)


def test_aggregation_hand_values():
    v = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(aggregate(v, mask, "seq_mean")) == pytest.approx((1 + 2) / 2)
    assert float(aggregate(v, mask, "token_mean")) == pytest.approx(7 / 4)
    assert float(aggregate(v, mask, "constant")) == pytest.approx(7 / 6)
    assert loss_normalizer(mask, "constant", max_tokens=8) == 16
    assert loss_normalizer(mask, "token_mean") == 4 and loss_normalizer(mask, "seq_mean") == 2
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(v, mask, "sum")


def test_seq_mean_leaves_whole_masked_rows_out_of_the_mean():
    # algo.overlong=mask zeroes the mask of truncated answers: the mean is over the other rows
    v = torch.tensor([[1.0, 0.0], [3.0, 3.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert loss_normalizer(mask, "seq_mean") == 2
    assert float(aggregate(v, mask, "seq_mean")) == pytest.approx((1 + 3) / 2)
    assert loss_normalizer(torch.zeros(3, 2), "seq_mean") == 1  # all masked: a zero loss, not 0/0


def _toy_batch(seed=0, B=7, T=6, V=11):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    tokens = torch.randint(0, V, (B, T), generator=g)
    feats = torch.randn(B, T, V, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 2
    ref = torch.randn(B, T, generator=g) * 0.1 - 2
    adv = torch.randn(B, generator=g)
    return mask, tokens, feats, old, ref, adv


def _grad(w, rows, batch, aggregation, normalizer):
    mask, tokens, feats, old, ref, adv = batch
    logits = feats[rows] * w  # a tiny differentiable "model"
    logp = token_logprobs(logits, tokens[rows])
    loss, _ = policy_loss(logp, old[rows], ref[rows], adv[rows], mask[rows], eps_low=0.2, eps_high=0.28,
                          beta=0.04, aggregation=aggregation, normalizer=normalizer)
    return torch.autograd.grad(loss, w)[0]


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "constant"])
def test_gradient_is_invariant_to_micro_batch_split(aggregation):
    batch = _toy_batch()
    w = torch.full((11,), 0.7, requires_grad=True)
    norm = loss_normalizer(batch[0], aggregation, max_tokens=6)
    full = _grad(w, slice(0, 7), batch, aggregation, norm)
    for cuts in ([0, 3, 4, 7], [0, 1, 2, 5, 7], [0, 6, 7]):
        parts = sum(_grad(w, slice(a, b), batch, aggregation, norm) for a, b in zip(cuts, cuts[1:]))
        assert torch.allclose(parts, full, atol=1e-6), cuts
    # without the global normaliser each micro-batch uses its own, and the split changes the gradient
    if aggregation != "constant":
        local = sum(_grad(w, slice(a, b), batch, aggregation, None) for a, b in [(0, 3), (3, 7)])
        assert not torch.allclose(local, full, atol=1e-4)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[0, [0, 1], [1, 0]][None])
    ent = entropy_from_logits(logits)
    assert float(ent[0, 0]) == pytest.approx(math.log(4))
    assert float(ent[0, 1]) < math.log(4)
    assert float(masked_mean(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]]))) == 1.0


# --------------------------------------------------------------------------- issue 7 options


def test_informative_groups_drop_all_equal_groups():
    rewards = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.4])
    assert informative_groups(rewards, 4).tolist() == [True, False, False, True]


def test_overlong_penalty_hand_values():
    # DAPO eq. 13 with L_max=20, L_cache=4: 0 up to 16 tokens, then -1/4 per token to -1 at 20
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]
    with pytest.raises(ValueError, match="buffer=0"):
        overlong_penalty(lengths, 20, 0)


def test_truncated_is_weights_token_and_sequence():
    old = torch.tensor([[math.log(0.6), math.log(0.2), 0.0]])
    sampler = torch.tensor([[math.log(0.5), math.log(0.4), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, sampler, mask, "token", cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.2, 0.5, 0.0])
    w = truncated_is_weights(old, sampler, mask, "sequence", cap=2.0)
    assert w.tolist()[0] == pytest.approx([0.6, 0.6, 0.0])  # 1.2 * 0.5 for every token
    big = truncated_is_weights(torch.tensor([[0.0]]), torch.tensor([[math.log(0.1)]]), torch.ones(1, 1), cap=2.0)
    assert float(big) == 2.0  # ratio 10, truncated at the cap


def test_is_weights_scale_the_policy_gradient_only():
    logp = torch.tensor([[math.log(0.6)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.3)]])
    loss, _ = policy_loss(logp, torch.tensor([[math.log(0.5)]]), ref, torch.tensor([1.0]), torch.ones(1, 1),
                          eps_low=0.5, eps_high=0.5, beta=0.1, is_weights=torch.tensor([[0.5]]))
    loss.backward()
    kl = 0.5 - math.log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log 0.5
    assert loss.item() == pytest.approx(0.5 * -1.2 + 0.1 * kl)
    assert float(logp.grad) == pytest.approx(0.5 * -1.2 + 0.1 * (1 - 0.5))


def test_entropy_bonus_pushes_entropy_up():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]], requires_grad=True)
    ent = entropy_from_logits(logits)
    logp = token_logprobs(logits, torch.tensor([[0]]))
    loss, _ = policy_loss(logp, logp.detach(), None, torch.zeros(1), torch.ones(1, 1), eps_low=0.2,
                          eps_high=0.2, beta=0.0, entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * float(ent.detach()))  # A = 0: only the bonus
    loss.backward()
    assert float(logits.grad[0, 0, 0]) > 0  # descending the loss lowers the dominant logit
    with pytest.raises(ValueError, match="entropy with grad"):
        policy_loss(logp.detach(), logp.detach(), None, torch.zeros(1), torch.ones(1, 1), eps_low=0.2,
                    eps_high=0.2, beta=0.0, entropy=ent.detach(), entropy_coef=0.01)
