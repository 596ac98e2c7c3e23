"""TrainBatch padding/trimming, the shared forward pass, and weight-bucket packing (no Ray)."""
import numpy as np
import pytest
import torch

from grpo_ray.models.modeling import batched_logprobs, load_causal_lm, response_logprobs
from grpo_ray.core.records import Rollout, TrainBatch
from grpo_ray.roles.weight_sync import pack_state_dict, unpack_bucket


def _rollout():
    return Rollout(prompt_ids=[[5, 6, 7], [8], [9, 10]], response_ids=[[11, 12], [13, 14, 15, 16], []],
                   old_logprobs=[[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3], []], texts=["a", "b", ""],
                   truncated=[False, True, False])


def test_train_batch_layout():
    b = TrainBatch.from_rollout(_rollout(), torch.tensor([1.0, -1.0, 0.0]), pad_id=0)
    assert b.prompt_len == 3 and b.response_mask.shape == (3, 4)
    assert b.input_ids[0].tolist() == [5, 6, 7, 11, 12, 0, 0]          # prompt left-aligned to column P
    assert b.input_ids[1].tolist() == [0, 0, 8, 13, 14, 15, 16]
    assert b.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert b.old_logprobs[1].tolist() == pytest.approx([-1.0, -1.1, -1.2, -1.3])
    assert b.response_ids[0].tolist() == [11, 12, 0, 0]


def test_concat_keeps_versions_and_the_slowest_generators_timings():
    """Generators sample side by side: the step waited for the slowest, so its queue and
    sampling times are the rollout's; select_groups keeps them."""
    a, b = _rollout(), _rollout()
    a.queued_s, a.sample_s, b.queued_s, b.sample_s = 0.01, 0.30, 0.02, 0.20
    both = Rollout.concat([a, b])
    assert len(both) == 6 and both.texts == ["a", "b", "", "a", "b", ""]
    assert (both.queued_s, both.sample_s) == (0.02, 0.30)
    picked = both.select_groups([1], group_size=3)
    assert picked.texts == ["a", "b", ""] and (picked.queued_s, picked.sample_s) == (0.02, 0.30)
    b.weight_version = 1
    with pytest.raises(RuntimeError, match="different weight versions"):
        Rollout.concat([a, b])


def test_select_trims_padding_columns():
    b = TrainBatch.from_rollout(_rollout(), torch.tensor([1.0, -1.0, 0.0]), pad_id=0)
    first = b.select(slice(0, 1))
    assert first.prompt_len == 3 and first.response_mask.shape == (1, 2)
    assert first.input_ids.tolist() == [[5, 6, 7, 11, 12]]
    third = b.select(slice(2, 3))
    assert third.prompt_len == 2 and third.input_ids[0, :2].tolist() == [9, 10]


def test_padded_logprobs_equal_unpadded(tiny_model_dir):
    """Left padding + position ids from the mask reproduce each sequence's own forward pass."""
    model = load_causal_lm(tiny_model_dir).eval()
    ro = _rollout()
    b = TrainBatch.from_rollout(ro, torch.zeros(3), pad_id=0)
    padded = batched_logprobs(model, b, micro_batch_size=2)
    for i in range(2):
        alone = TrainBatch.from_rollout(Rollout([ro.prompt_ids[i]], [ro.response_ids[i]], [ro.old_logprobs[i]],
                                                ["x"], [False]), torch.zeros(1), pad_id=0)
        with torch.no_grad():
            lp, ent = response_logprobs(model, alone, with_entropy=True)
        n = len(ro.response_ids[i])
        assert torch.allclose(padded[i, :n], lp[0], atol=1e-5)
        assert ent.shape == lp.shape and (ent >= 0).all()
    assert padded[2].abs().sum() == 0  # an empty response contributes nothing


def test_tempered_bf16_logprobs_scale_the_logits_in_float32(tiny_model_dir):
    """vLLM's sampler divides float32 logits by T; dividing bf16 logits rounds them a second time
    (~0.02 nats a token on a 32k vocabulary), a mismatch the ratio would start from."""
    model = load_causal_lm(tiny_model_dir, "bfloat16").eval()
    b = TrainBatch.from_rollout(_rollout(), torch.zeros(3), pad_id=0)
    with torch.no_grad():
        lp, _ = response_logprobs(model, b, temperature=0.7, share_prompts=False)
        position_ids = (b.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=position_ids).logits
        assert logits.dtype == torch.bfloat16
        T = b.response_mask.shape[1]
        want = torch.log_softmax(logits[:, b.prompt_len - 1:-1].float() / 0.7, dim=-1)
        want = want.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1) * b.response_mask
    assert want.shape == (3, T) and torch.allclose(lp * b.response_mask, want, atol=1e-5)


def test_disable_dropout_makes_the_train_mode_forward_deterministic(tiny_model_dir, tmp_path):
    """A model saved with dropout (attention_dropout 0.5 here; GPT-2-style configs use 0.1):
    the learner's train-mode forward must give the logprobs the sampler had."""
    from transformers import AutoModelForCausalLM

    from grpo_ray.models.modeling import disable_dropout

    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path)).train()
    model.add_module("extra", torch.nn.Dropout(0.3))  # an nn.Dropout too
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout acts
        disable_dropout(model)
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert model.extra.p == 0.0


def test_weight_buckets_round_trip_and_split():
    tensors = [("a", torch.randn(3, 4)), ("b", torch.arange(10, dtype=torch.int64)), ("c", torch.randn(100))]
    buckets = pack_state_dict(tensors, bucket_bytes=64)
    assert len(buckets) == 3  # each tensor exceeds 64 bytes with the previous one
    out = dict(x for bk in buckets for x in unpack_bucket(bk))
    for name, t in tensors:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)
    one = pack_state_dict(tensors)
    assert len(one) == 1 and isinstance(one[0].data, np.ndarray)
    half = dict(unpack_bucket(pack_state_dict(tensors, dtype=torch.bfloat16)[0]))
    assert half["a"].dtype == torch.bfloat16 and half["b"].dtype == torch.int64
    # 3 bf16 values (6 bytes), then an int64 buffer: packed back to back, its view needed offset 8k
    odd = [("w", torch.randn(3)), ("steps", torch.arange(3, dtype=torch.int64)), ("m", torch.tensor([True]))]
    out = dict(unpack_bucket(pack_state_dict(odd, dtype=torch.bfloat16)[0]))
    assert torch.equal(out["steps"], odd[1][1]) and torch.equal(out["w"], odd[0][1].bfloat16())
    assert out["m"].item() is True


def _grouped_batch(groups: int = 3, group_size: int = 4, seed: int = 0) -> TrainBatch:
    """GRPO-shaped: each prompt (of varying length) answered group_size times, responses of
    varying length (including a 1-token one and an empty one)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for j in range(groups):
        prompt = torch.randint(3, 200, (3 + 2 * j,), generator=g).tolist()
        for k in range(group_size):
            prompts.append(prompt)
            n = 0 if (j, k) == (0, 0) else 1 if (j, k) == (1, 1) else int(torch.randint(2, 9, (1,), generator=g))
            responses.append(torch.randint(3, 200, (n,), generator=g).tolist())
    ro = Rollout(prompts, responses, [[-1.0] * len(r) for r in responses], [""] * len(responses),
                 [False] * len(responses))
    return TrainBatch.from_rollout(ro, torch.randn(len(responses), generator=g), pad_id=0)


def test_micro_batches_sorted_by_length_cover_every_row_once():
    b = _grouped_batch()
    parts = b.micro_batches(5)
    rows = torch.cat([r for r, _ in parts])
    assert sorted(rows.tolist()) == list(range(b.size))
    lengths = b.response_mask.sum(dim=1)
    assert lengths[rows].tolist() == sorted(lengths.tolist())  # shortest first: less padding
    for r, mb in parts:  # each micro-batch padded only to its own longest response
        assert mb.response_mask.shape[1] == max(1, int(lengths[r].max()))
        assert torch.equal(mb.advantages, b.advantages[r])


@pytest.mark.parametrize("rows,attn", [(slice(0, 12), "sdpa"), (slice(2, 9), "sdpa"), (slice(0, 12), "eager")])
def test_shared_prompt_pass_equals_the_plain_pass(tiny_model_dir, rows, attn):
    """Prompts run once per group, their completions packed behind the prompt's KV cache, give
    the same logprobs, entropy and gradient as running every row's prompt; also for a slice that
    cuts groups apart (as micro-batches and learner ranks do), and with eager attention (an
    additive mask). In this batch, rows hold several completions and groups span several rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    b = _grouped_batch().select(rows)
    from grpo_ray.models.modeling import _prompt_groups

    assert _prompt_groups(b) is not None  # the shared path really runs
    out = {}
    for share in (False, True):
        model.zero_grad()
        lp, ent = response_logprobs(model, b, with_entropy=True, share_prompts=share)
        (lp * b.response_mask * b.advantages[:, None]).sum().backward()
        out[share] = (lp.detach() * b.response_mask, ent * b.response_mask,
                      [p.grad.clone() for p in model.parameters()])
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    for g_share, g_plain in zip(out[True][2], out[False][2]):
        assert torch.allclose(g_share, g_plain, atol=1e-5, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in out[True][2]) > 0


@pytest.mark.parametrize("capacity", [0, 256])
def test_pack_plan_places_every_response_token_once(capacity):
    from grpo_ray.models.modeling import _prompt_groups
    from grpo_ray.core.packing import pack_plan

    b = _grouped_batch()
    P, T = b.prompt_len, b.response_mask.shape[1]
    _, inverse = _prompt_groups(b)
    plan = pack_plan(b.input_ids, b.attention_mask, P, inverse, capacity)
    n = b.attention_mask[:, P:].sum(dim=1)
    want = sorted(i * T + k for i in range(b.size) for k in range(int(n[i])))
    assert sorted(plan.dst.tolist() + plan.first_dst.tolist()) == want  # each scored token once
    R, L = plan.input_ids.shape
    assert L <= max(capacity, int(n.max()) - 1) and len(plan.src) == len(set(plan.src.tolist()))
    for src, dst in zip(plan.src.tolist(), plan.dst.tolist()):
        i, k = divmod(dst, T)  # slot src feeds token k-1 of response i, at its true position
        r, c = divmod(src, L)
        assert plan.input_ids[r, c] == b.input_ids[i, P + k - 1]
        assert plan.position_ids[r, c] == b.attention_mask[i, :P].sum() + k - 1
        assert plan.row_prompt[r] == inverse[i]
        seen = plan.mask[r, 0, c, P:]  # its own completion's earlier slots, nothing else in the row
        assert seen.sum() == k and bool(seen[c - k + 1:c + 1].all())
    fed_per_row = torch.bincount(plan.src // L, minlength=R)
    if capacity == 0:  # rows as long as the longest answer: groups spread over several rows
        assert L == int(n.max()) - 1 and R > int(inverse.max()) + 1
    assert R < int((n > 1).sum())  # and rows hold several completions (fewer rows than answers)
    assert int(fed_per_row.min()) > 0  # no empty rows


def test_prompt_groups_map_rows_to_a_row_with_the_same_prompt():
    from grpo_ray.models.modeling import _prompt_groups

    assert _prompt_groups(_grouped_batch(groups=4, group_size=1)) is None  # nothing to share
    b = _grouped_batch(groups=2, group_size=3)
    first, inverse = _prompt_groups(b)
    assert len(first) == 2 and sorted(inverse.tolist()) == [0, 0, 0, 1, 1, 1]
    P = b.prompt_len
    for i in range(b.size):
        j = int(first[inverse[i]])
        assert torch.equal(b.input_ids[j, :P], b.input_ids[i, :P])
        assert torch.equal(b.attention_mask[j, :P], b.attention_mask[i, :P])


@pytest.mark.parametrize("rows,count,group", [(512, 2, 16), (48, 3, 16), (20, 2, 4), (10, 4, 3), (5, 8, 1)])
def test_row_shares_cover_every_row_once_and_keep_groups_whole(rows, count, group):
    """The reference in the learner ranks: rank i scores share i of the rows; the shares tile the
    batch in order, cut between a prompt's completions only when the group size does not divide
    the batch, and differ by at most one group."""
    from grpo_ray.core.records import row_share

    shares = [row_share(rows, i, count, group) for i in range(count)]
    assert [r for s in shares for r in range(rows)[s]] == list(range(rows))
    unit = group if rows % group == 0 else 1
    sizes = [s.stop - s.start for s in shares]
    assert all(s.start % unit == 0 for s in shares) and max(sizes) - min(sizes) <= unit


def test_a_share_of_the_reference_pass_is_those_rows_of_the_whole_pass(tiny_model_dir):
    """Reference.logprobs over a share of the rows (trimmed padding, padded back to [rows, T])
    gives those rows of the pass over the whole batch."""
    from grpo_ray.roles.reference import Reference

    # 3 prompts x 2 completions of uneven lengths: the last share's padding is trimmed away
    prompts = [[5, 6, 7], [5, 6, 7], [8], [8], [9, 10], [9, 10]]
    responses = [[11, 12], [13], [14, 15, 16, 17, 18], [19, 20], [21], [22, 23]]
    ro = Rollout(prompts, responses, [[-1.0] * len(r) for r in responses], ["x"] * 6, [False] * 6)
    ref, b = Reference(tiny_model_dir, micro_batch_size=4), TrainBatch.from_rollout(ro, torch.zeros(6), pad_id=0)
    whole = ref.logprobs(b)
    parts = [ref.logprobs(b, (i, 3, 2)) for i in range(3)]
    assert all(p.shape[1] == whole.shape[1] for p in parts)
    assert float((torch.cat(parts) - whole).abs().max()) < 1e-5
