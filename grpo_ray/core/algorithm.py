"""Pure GRPO math: advantages, log-probabilities, KL, clipped policy loss, token aggregation.

Imports torch only: no Ray, no config objects, so every function is testable by hand.
Shapes use B = sequences in the (micro-)batch, T = padded response length, V = vocabulary.

References
- GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), eq. 3 and 4.
- DeepSeek-R1 (arXiv:2501.12948): epsilon=10, beta=0.001, group_size=16.
- DAPO: Yu et al. 2025 (arXiv:2503.14476): clip-higher, token-mean aggregation.
- Dr. GRPO: Liu et al. 2025 (arXiv:2503.20783): no std scaling, constant normaliser.
- RLOO: Ahmadian et al. 2024 (arXiv:2402.14740): leave-one-out baseline.
- k3 KL estimator: J. Schulman, "Approximating KL Divergence" (2020).
- Dual clip: Ye et al. 2020 (arXiv:1912.09729).
- Dynamic sampling, overlong filtering and soft overlong punishment: DAPO, sections 3.2 and 3.4.
- Truncated importance sampling (TIS): Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training" (fengyao.notion.site/off-policy-rl); IMPALA's truncated
  weights (Espeholt et al. 2018, arXiv:1802.01561).
"""
from __future__ import annotations

import torch

def _grpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean) / (std + eps), population std (DeepSeekMath eq. 3's outcome supervision)."""
    mean = grouped.mean(dim=1, keepdim=True)
    return (grouped - mean) / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)


def _dr_grpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """r - mean: Dr. GRPO (Liu et al. 2025) drops the std division, which up-weights easy/hard groups."""
    return grouped - grouped.mean(dim=1, keepdim=True)


def _rloo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """r - mean of the other G-1 rewards of the group (leave-one-out baseline, Ahmadian et al. 2024)."""
    G = grouped.shape[1]
    if G < 2:
        raise ValueError("estimator='rloo' needs group_size >= 2")
    return grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)


# Advantage estimators by name (algo.estimator): fn(grouped rewards [P, G] float64, eps) -> [P, G].
# A new estimator is one function here and one entry in this table; the config's allowed values
# are its keys.
ESTIMATOR_FNS = {"grpo": _grpo, "dr_grpo": _dr_grpo, "rloo": _rloo}
ESTIMATORS = tuple(ESTIMATOR_FNS)
AGGREGATIONS = ("seq_mean", "token_mean", "constant")
TIS_LEVELS = ("token", "sequence")


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-8, estimator: str = "grpo"
) -> torch.Tensor:
    """Per-completion advantage from its group's rewards.

    rewards: [num_prompts * group_size], the group of prompt p is rewards[p*G:(p+1)*G].
    returns: [num_prompts * group_size], float32.

    grpo:    (r - mean) / (std + eps), population std, so [0,1,1,0] -> [-1,1,1,-1] and a
             group of equal rewards gives zeros (no signal, no gradient).
    dr_grpo: r - mean (Dr. GRPO drops the std division, which up-weights easy/hard groups).
    rloo:    r - mean of the other G-1 rewards of the group (leave-one-out baseline).
    Whatever the estimator, a group of equal rewards gets exactly zeros.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be a flat tensor of num_prompts * group_size values; got shape "
            f"{tuple(rewards.shape)} with group_size={group_size}"
        )
    if estimator not in ESTIMATOR_FNS:
        raise ValueError(f"estimator={estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    # float64: in float32 the mean of G copies of e.g. 0.1 is not 0.1, and (r - mean) / (std + eps)
    # of a constant group was ~1e-9 / ~1e-8, a large uniform advantage instead of zero
    grouped = rewards.double().view(-1, group_size)  # [P, G]
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # [P, 1]
    adv = ESTIMATOR_FNS[estimator](grouped, eps)
    return adv.masked_fill(constant, 0.0).float().reshape(-1)  # equal rewards: exactly no signal


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: a group whose rewards are all equal has zero advantages and gives
    no gradient. rewards: [P * G] -> [P] bool, True where the group's rewards differ."""
    grouped = rewards.double().view(-1, group_size)  # float64: 1e9 + 1 != 1e9
    return grouped.max(dim=1).values > grouped.min(dim=1).values


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the reward.

    lengths: [B] response lengths in tokens; max_len: L_max (rollout.max_new_tokens); buffer:
    L_cache. 0 up to L_max - L_cache, then a linear ramp to -factor at L_max (and beyond):
    -factor * clamp(|y| - (L_max - L_cache), 0, L_cache) / L_cache. Returns [B] float32.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer={buffer} must be in (0, max_len={max_len}]")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * over / buffer


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor,
                         level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights that correct for the sampler (vLLM) and the learner
    computing different probabilities for the same weights (kernels, precision).

    old_logprobs:     [B, T] the learner's logprobs of the sampled tokens before the update.
    sampler_logprobs: [B, T] the sampler's logprobs of the same tokens.
    token:    w_t = min(exp(old_t - sampler_t), cap)
    sequence: w   = min(exp(sum_t (old_t - sampler_t)), cap), the same for every token.
    Returns [B, T] float32, detached, 0 on padding. Multiplies the policy-gradient term only.
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"level={level!r}; allowed: {', '.join(TIS_LEVELS)}")
    mask = response_mask.float()
    log_w = ((old_logprobs - sampler_logprobs).float() * mask).detach()
    if level == "sequence":
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(mask)
    return torch.exp(log_w.clamp(max=20.0)).clamp(max=cap) * mask


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_ids) under logits. logits: [B, T, V]; token_ids: [B, T] -> [B, T] float32."""
    logits = logits.float()
    picked = torch.gather(logits, -1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position. logits: [B, T, V] -> [B, T] float32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref) on the sampled tokens.

    exp(ref - logp) - (ref - logp) - 1: unbiased (E_policy[exp(ref-logp)] = 1), always >= 0.
    logprobs, ref_logprobs: [B, T] -> [B, T]. The log-ratio is clamped to +-20 only to keep
    exp() finite on padding or wildly off tokens; inside that range the value is exact.
    """
    delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.exp(delta) - delta - 1.0


def loss_normalizer(response_mask: torch.Tensor, aggregation: str, max_tokens: int | None = None) -> float:
    """The denominator `aggregate` divides by, computed once over the WHOLE batch of a step.

    response_mask: [B, T]. Passing this number to every micro-batch (on every rank) makes the sum
    of the micro-batch losses equal the full-batch loss, so gradients do not depend on the split.
    seq_mean -> number of sequences with a token in the loss (a row masked whole, as DAPO's
    overlong filter masks truncated answers, is left out of the mean, not counted as a 0 that
    shrinks every other row's weight by the step's truncation rate);
    token_mean -> number of response tokens;
    constant -> number of sequences * max_tokens (Dr. GRPO's fixed budget; default: T).
    """
    if aggregation == "seq_mean":
        return float((response_mask.sum(dim=1) > 0).sum().clamp(min=1).item())
    if aggregation == "token_mean":
        return float(response_mask.sum().clamp(min=1).item())
    if aggregation == "constant":
        return float(response_mask.shape[0] * (max_tokens or response_mask.shape[1]))
    raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def aggregate(
    values: torch.Tensor, response_mask: torch.Tensor, aggregation: str, normalizer: float | None = None
) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar.

    seq_mean (DeepSeekMath eq. 3): sum_i (sum_t v_it / |o_i|) / normalizer
    token_mean (DAPO eq. 8):       sum_it v_it / normalizer
    constant (Dr. GRPO):           sum_it v_it / normalizer
    With normalizer=None the batch's own (`loss_normalizer` of this mask) is used.
    """
    mask = response_mask.to(values.dtype)
    if normalizer is None:
        normalizer = loss_normalizer(response_mask, aggregation)
    if aggregation == "seq_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / normalizer
    if aggregation in ("token_mean", "constant"):
        return (values * mask).sum() / normalizer
    raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1 (0 if the mask is empty). [B, T], [B, T] -> scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    aggregation: str = "seq_mean",
    normalizer: float | None = None,
    clip_ratio_c: float | None = None,
    is_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate with a k3 KL penalty in the loss (not in the reward).

    logprobs:      [B, T] current policy, with grad.
    old_logprobs:  [B, T] the SAMPLING policy's, recorded at rollout time and reused for every
                   mini-batch and epoch. Recomputing them at update time makes ratio == 1, and
                   clipping never acts.
    ref_logprobs:  [B, T] frozen reference policy (None when beta == 0 and no reference runs:
                   then the metrics have no "kl").
    advantages:    [B] per sequence (broadcast over tokens) or [B, T] per token.
    response_mask: [B, T] 1 on response tokens that count, 0 on padding.

    per token: -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + beta * k3, with r = exp(logp - old).
    clip_ratio_c (dual clip): for A < 0 the surrogate term is capped at -clip_ratio_c * A.
    is_weights:    [B, T] truncated importance weights (truncated_is_weights), detached; they
                   multiply the surrogate term (not the KL). None = 1.
    entropy:       [B, T] policy entropy WITH grad; with entropy_coef > 0 the loss gets
                   -entropy_coef * entropy per token (an exploration bonus; off by default).
    Returns the scalar loss and detached token-mean metrics over this batch's response tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surrogate = -ratio * advantages
    surrogate_clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    pg = torch.maximum(surrogate, surrogate_clipped)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c={clip_ratio_c}; dual clip needs a value > 1 (e.g. 3.0)")
        pg = torch.where(advantages < 0, torch.minimum(pg, -clip_ratio_c * advantages), pg)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    per_token = pg
    if entropy_coef:
        if entropy is None or not entropy.requires_grad:
            raise ValueError("entropy_coef != 0 needs the per-token entropy with grad")
        per_token = per_token - entropy_coef * entropy
    kl = None if ref_logprobs is None else kl_k3(logprobs, ref_logprobs)  # none measured: no kl metric
    if beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        per_token = per_token + beta * kl
    loss = aggregate(per_token, response_mask, aggregation, normalizer)
    metrics = _loss_metrics(ratio, advantages, pg, kl, response_mask, eps_low, eps_high, aggregation, normalizer)
    if clip_ratio_c is not None:  # tokens the dual clip holds at -c*A: no gradient either
        metrics["clip/dual"] = masked_mean(((ratio > clip_ratio_c) & (advantages < 0)).float(), response_mask)
    return loss, metrics


@torch.no_grad()
def _loss_metrics(ratio, advantages, pg, kl, response_mask, eps_low, eps_high, aggregation, normalizer):
    """Detached token means over the response tokens (ratio, kl, pg, response_mask: [B, T];
    advantages: [B, 1] or [B, T]). clip/low and clip/high count the tokens where the clip acts,
    i.e. where the token gets no gradient from the surrogate."""
    mask = response_mask.bool()
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    masked_ratio = ratio[mask] if mask.any() else ratio.new_ones(1)
    return {
        "pg_loss": aggregate(pg.detach(), response_mask, aggregation, normalizer),
        **({} if kl is None else {"kl": masked_mean(kl.detach(), response_mask)}),
        "clip/low": masked_mean(low.float(), response_mask),
        "clip/high": masked_mean(high.float(), response_mask),
        "ratio/mean": masked_mean(ratio.detach(), response_mask),
        "ratio/max": masked_ratio.max(),
        "ratio/min": masked_ratio.min(),
    }
