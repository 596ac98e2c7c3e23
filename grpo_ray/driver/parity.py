"""The weight-sync parity guard (issue 28). Every step the learner measures `sampler_kl`: the
token mean of the sampler's logprob minus its own on the sampled tokens, before its first
optimizer step, when the generators and the learner should hold the same weights. What is left
is the numerics of the dtype (float32: ~1e-8 measured on the tiny model; bfloat16: ~1e-3). A
generator whose samples disagree by more (algo.sampler_kl_max) is not running the learner's
policy: a weight load that went wrong, a partial load, a generator on another model; and the
run would silently train on the wrong policy.

Per generator: the learner reports its mismatch per row (LearnerGroup.results), each row came
from one generator (Rollout.generators), so each generator's sampler_kl is the token-weighted
mean over its rows. A generator above the threshold: a warning and a `parity` event, and the
learner's current weights are pushed to every generator again (GeneratorFleet.resync), so the
next step samples from them. The step that found it has already trained on those samples (its
old_logprobs were the sampler's; the ratio's clipping bounds the damage of one step). If the
next step finds a generator above the threshold again, the run stops (ParityStop), naming it.
"""
from __future__ import annotations

from ..config import Config, ConfigError

# the step's mismatch per generator travels in train_step's metrics under this key, for
# Run.loop to pop (Run.parity), never logged as a metric: {generator index: (sampler_kl, tokens)}
PARITY = "sampler_kl_by_generator"

# algo.sampler_kl_max when null, per model.dtype: far above what the dtype explains (float32 vLLM
# against the learner: |sampler_kl| ~1e-8 on the tiny model's runs, 1e-6 a token; bfloat16 vLLM
# against a float32 forward: at most 4.8e-3 a token, so its mean below that), below a wrong policy
# (the tiny model's weights times 1.5 on one generator: 0.02-0.09)
AUTO_MAX = {"float32": 1e-3, "bfloat16": 1e-2}


class ParityStop(ConfigError):
    """A generator's samples still disagreed with the learner after its weights were pushed again:
    the run stops, in one line, naming the generator."""


def threshold(cfg: Config) -> float | None:
    """algo.sampler_kl_max, or by model.dtype when null; None (no guard) when null with
    rollout.asynchronous: its samples come from the weights one update behind the learner, and
    sampler_kl then measures that lag as well (> 1e-3 at learner.lr=1e-2)."""
    if cfg.algo.sampler_kl_max is not None:
        return cfg.algo.sampler_kl_max
    return None if cfg.rollout.asynchronous else AUTO_MAX[cfg.model.dtype]


def verdict(by_generator: dict[int, tuple[float, float]], limit: float | None,
            pushed_again: bool) -> tuple[dict[int, float], bool]:
    """({generator: sampler_kl} for those above `limit`, whether to stop): stop when any is above
    and the weights were pushed again after the step before (pushed_again); otherwise those above
    get the weights pushed again."""
    if limit is None:
        return {}, False
    above = {g: kl for g, (kl, _) in by_generator.items() if kl > limit}
    return above, bool(above) and pushed_again


def describe(above: dict[int, float], names: list[str], by_generator: dict) -> str:
    """'generator 1 (node ..., pid ...): sampler_kl 0.31 over 120 tokens, ...' (worst first)."""
    return ", ".join(f"{names[g] if g < len(names) else f'generator {g}'}: sampler_kl {kl:.3g} over "
                     f"{by_generator[g][1]:.0f} tokens" for g, kl in sorted(above.items(), key=lambda x: -x[1]))
