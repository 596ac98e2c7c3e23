"""Seeded sampling on vLLM's CPU backend (grpo_ray/roles/generator.py, `_install_seeded_cpu_sampler`):
the step seeds' hash against a plain-Python SplitMix64, then vLLM's own sampler module with the
patch: the right distribution, one reproducible stream per seed whatever shares the batch."""
from __future__ import annotations

import random

import pytest
import torch

from grpo_ray.roles.generator import splitmix64

M64 = (1 << 64) - 1


def _splitmix64_reference(x: int) -> int:
    """SplitMix64's output function on unsigned 64-bit Python ints (Steele, Lea & Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_splitmix64_on_int64_tensors_matches_the_unsigned_reference():
    rng = random.Random(0)
    values = [0, 1, 2, (1 << 63) - 1, 1 << 62, 123456789] + [rng.getrandbits(63) for _ in range(500)]
    got = splitmix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & M64 for g in got] == [_splitmix64_reference(v) for v in values]


@pytest.fixture(scope="module")
def sampler():
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.fused_gumbel_argmax)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from grpo_ray.roles.generator import _install_seeded_cpu_sampler

    _install_seeded_cpu_sampler()
    _install_seeded_cpu_sampler()  # idempotent: a second generator in the process
    s = TopKTopPSampler()
    assert getattr(s.forward, "_grpo_seeded", False), "the CPU sampler is not the seeded one"
    return s


def _draw(sampler, logits: torch.Tensor, seeds: dict[int, int], steps: int) -> torch.Tensor:
    """Tokens [steps, B]: rows in `seeds` sample with their own generator, the others unseeded."""
    gens = {row: torch.Generator().manual_seed(seed) for row, seed in seeds.items()}
    return torch.stack([sampler(logits.clone(), gens, None, None)[0] for _ in range(steps)])


def test_seeded_rows_sample_the_softmax_distribution(sampler):
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    B, steps = 64, 400
    logits = probs.log().expand(B, -1).contiguous()
    tokens = _draw(sampler, logits, {row: 1000 + row for row in range(B)}, steps)
    freq = torch.bincount(tokens.flatten(), minlength=6).double() / tokens.numel()
    # 25,600 draws: each frequency's standard error is <= 0.0031
    assert float((freq - probs.double()).abs().max()) < 0.015, freq
    # rows and steps are not locked together: neighbouring seeds and successive steps differ
    assert float((tokens[:, 0] == tokens[:, 1]).double().mean()) < 0.45  # P(same) = sum p^2 = 0.31
    assert float((tokens[1:] == tokens[:-1]).double().mean()) < 0.45


def test_a_seed_gives_the_same_stream_whatever_shares_the_batch(sampler):
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    alone = _draw(sampler, logits[:1], {0: 77}, 30)[:, 0]
    # the same row at index 5 of a batch of other seeded and unseeded rows
    mixed = torch.cat([logits[1:6], logits[:1], logits[6:]])
    among = _draw(sampler, mixed, {1: 5, 5: 77, 6: 9, 7: 11}, 30)
    assert torch.equal(alone, among[:, 5])
    assert torch.equal(_draw(sampler, logits[2:3], {0: 5}, 30)[:, 0], among[:, 1])
    other = _draw(sampler, logits[:1], {0: 78}, 30)[:, 0]
    assert not torch.equal(alone, other)
