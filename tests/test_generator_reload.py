"""Loading the learner's weights into a running vLLM engine (in-process, no Ray): the CPU fast
path must give the sampler exactly the weights it was sent, the tied LM head included."""
import pytest
import torch

from grpo_ray.roles.weight_sync import pack_state_dict

pytestmark = pytest.mark.slow

PROMPTS = ["Q: 1+2=?\nA:", "Q: 13+29=?\nA:"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    from grpo_ray.roles.generator import Generator

    return Generator(tiny_model_dir, cpu_threads="0", seed=0)


def _perturbed(model_dir, seed):
    """The tiny model with every kind of tensor moved: the tied embedding, q/k/v (packed
    together in vLLM), gate/up, biases and norms."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tied, as the default model
    return hf


def _max_error_vs_hf(gen, hf, seed):
    """Largest |sampler logprob - HF forward logprob| over sampled tokens."""
    ro = gen.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=seed)
    worst = 0.0
    for p, r, lp in zip(ro.prompt_ids, ro.response_ids, ro.old_logprobs):
        with torch.no_grad():
            logits = hf(torch.tensor([p + r])).logits[0, len(p) - 1:-1].log_softmax(-1)
        want = logits.gather(-1, torch.tensor(r)[:, None])[:, 0]
        gap = (want - torch.tensor(lp)).abs()
        worst = max(worst, float(gap.max()) if bool(torch.isfinite(gap).all()) else float("inf"))  # NaN: garbage
    return worst, ro


def _plan(worker):
    model = worker.model_runner.model
    return [(type(layer).__name__, meta is not None, layer.weight.numel()) for _, layer, meta in model._grpo_cpu_gemms]


def test_onednn_handle_is_a_packed_copy():
    """Why every reload must pack the handles again: writing the weight in place does not
    reach a handle packed from it."""
    from vllm import _custom_ops as ops

    w, x = torch.randn(64, 32), torch.randn(3, 32)
    handle = ops.create_onednn_mm(w.t(), 32)
    before = ops.onednn_mm(handle, x, None)
    w.mul_(2.0)
    assert torch.allclose(ops.onednn_mm(handle, x, None), before)


def test_reload_gives_the_sampler_the_sent_weights(gen, tiny_model_dir):
    hf = _perturbed(tiny_model_dir, seed=1)
    stale, _ = _max_error_vs_hf(gen, hf, seed=0)
    assert stale > 1e-2  # the engine still has the start-up weights
    assert gen.update_weights(pack_state_dict(hf.state_dict().items()), 1) > 0
    plan = gen.llm.collective_rpc(_plan)[0]
    # the fast path ran: packed linears got full weights for the load, then empty placeholders again
    assert sum(1 for _, packed, _ in plan if packed) == 8 and all(n == 0 for _, packed, n in plan if packed)
    assert {name for name, packed, _ in plan if not packed} == {"VocabParallelEmbedding", "ParallelLMHead"}
    err, _ = _max_error_vs_hf(gen, hf, seed=0)
    assert err < 1e-4


def test_tied_head_follows_the_embedding_when_only_it_is_sent(gen, tiny_model_dir):
    """named_parameters() lists a tied weight once (no lm_head.weight). vLLM's generic reload
    then keeps the head's handle packed from the old embedding; ours packs it again."""
    hf = _perturbed(tiny_model_dir, seed=2)
    sent = pack_state_dict(hf.named_parameters())
    assert not any(e[0].startswith("lm_head") for b in sent for e in b.entries)
    gen.update_weights(sent, 2)
    err, _ = _max_error_vs_hf(gen, hf, seed=1)
    assert err < 1e-4


def test_fast_and_generic_reload_sample_the_same(gen, tiny_model_dir):
    hf = _perturbed(tiny_model_dir, seed=3)
    buckets = pack_state_dict(hf.state_dict().items())
    gen.update_weights(buckets, 3)
    fast = gen.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=5)

    def generic(worker):
        worker.model_runner.model._grpo_cpu_gemms = []  # [] = vLLM's own reload_weights

    def restore(worker):
        del worker.model_runner.model._grpo_cpu_gemms

    gen.llm.collective_rpc(generic)
    try:
        gen.update_weights(pack_state_dict(_perturbed(tiny_model_dir, seed=4).state_dict().items()), 4)
        gen.update_weights(buckets, 5)
        slow = gen.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=5)
    finally:
        gen.llm.collective_rpc(restore)
    assert slow.response_ids == fast.response_ids
    assert max(abs(a - b) for x, y in zip(slow.old_logprobs, fast.old_logprobs) for a, b in zip(x, y)) < 1e-6
    # back on the fast path after the generic one, whose deferring loader wrappers stay on the
    # tensors vLLM recorded at start-up: the load must still reach the engine
    hf = _perturbed(tiny_model_dir, seed=12)
    gen.update_weights(pack_state_dict(hf.state_dict().items()), 6)
    err, _ = _max_error_vs_hf(gen, hf, seed=4)
    assert err < 1e-4


def test_a_failed_or_partial_load_is_an_error_and_sampling_waits_for_a_whole_one(gen, tiny_model_dir):
    """Blocks load one after another: a load that fails part way leaves old and new layers
    mixed, so the generator refuses to sample until a whole set arrives."""
    hf = _perturbed(tiny_model_dir, seed=6)
    state = list(hf.state_dict().items())
    partial = [(n, t) for n, t in state if n != "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"1 of the engine's weights were not sent .*layers\.1\.mlp\.down_proj"):
        gen.update_weights(pack_state_dict(partial), 6)
    with pytest.raises(RuntimeError, match="last weight load failed .*ValueError"):
        gen.generate(PROMPTS, n=1, temperature=1.0, max_new_tokens=2)
    misnamed = [("model.layers.0.mlp.nope.weight" if n.endswith("0.mlp.up_proj.weight") else n, t) for n, t in state]
    with pytest.raises(Exception):
        gen.update_weights(pack_state_dict(misnamed), 7)
    with pytest.raises(RuntimeError, match="last weight load failed"):
        gen.generate(PROMPTS, n=1, temperature=1.0, max_new_tokens=2)
    gen.update_weights(pack_state_dict(state), 8)
    err, ro = _max_error_vs_hf(gen, hf, seed=2)
    assert err < 1e-4 and ro.weight_version == 8


def test_a_large_model_loads_block_by_block(gen, tiny_model_dir):
    """Beyond group_bytes of dropped weights per group, blocks load in separate groups (the
    engine's extra memory during a load stays bounded); the result is the same."""
    hf = _perturbed(tiny_model_dir, seed=11)

    def load_per_block(worker, buckets):
        from grpo_ray.roles.engine_weights import _reload_cpu_gemms
        from grpo_ray.roles.weight_sync import unpack_bucket

        model = worker.model_runner.model
        calls, original = [], model.load_weights
        model.load_weights = lambda w: (calls.append(sorted({n.split(".")[2] if ".layers." in n else "-" for n, _ in w})),
                                        original(w))[1]
        try:
            _reload_cpu_gemms(model, model._grpo_cpu_gemms, [x for b in buckets for x in unpack_bucket(b)], group_bytes=1)
        finally:
            del model.load_weights
        return calls

    calls = gen.llm.collective_rpc(load_per_block, args=(pack_state_dict(hf.state_dict().items()),))[0]
    # group_bytes counts the weights a group re-creates; the embedding is loaded in place
    assert calls == [["-", "0"], ["1"]]
    err, _ = _max_error_vs_hf(gen, hf, seed=3)
    assert err < 1e-4


def test_bf16_fast_and_generic_reload_sample_the_same(tiny_model_dir):
    """bf16 engines may pack small matmuls with another kernel (and keep fp32 biases). Last in
    the file: a second engine in one process tears down vLLM's process groups when it goes."""
    from grpo_ray.roles.generator import Generator

    g = Generator(tiny_model_dir, cpu_threads="0", seed=0, dtype="bfloat16")
    buckets = pack_state_dict(_perturbed(tiny_model_dir, seed=9).state_dict().items(), dtype=torch.bfloat16)
    g.update_weights(buckets, 1)
    plan = g.llm.collective_rpc(_plan)[0]
    # AVX-512 CPUs pack the 8 bf16 matmuls and drop their weights; an AVX2-only CPU (an AMD EPYC
    # without AVX-512, 2026-12-06) keeps all 10 bf16 weights, and the plan loads them in place
    assert len(plan) == 10 and sum(1 for _, packed, _ in plan if packed) in (0, 8), plan
    fast = g.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=5)

    def generic(worker):
        worker.model_runner.model._grpo_cpu_gemms = []

    g.llm.collective_rpc(generic)
    g.update_weights(pack_state_dict(_perturbed(tiny_model_dir, seed=10).state_dict().items()), 2)
    g.update_weights(buckets, 3)
    slow = g.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=5)
    assert slow.response_ids == fast.response_ids and slow.old_logprobs == fast.old_logprobs
