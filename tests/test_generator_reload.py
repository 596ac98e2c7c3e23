"""Loading the learner's weights into a running vLLM engine (in-process, no Ray): the CPU fast
path must give the sampler exactly the weights it was sent, the tied LM head included."""
import pytest
import torch

from grpo_ray.weight_sync import pack_state_dict

pytestmark = pytest.mark.slow

PROMPTS = ["Q: 1+2=?\nA:", "Q: 13+29=?\nA:"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    from grpo_ray.generator import Generator

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
        worst = max(worst, float((want - torch.tensor(lp)).abs().max()))
    return worst, ro


def _plan(worker):
    model = worker.model_runner.model
    return [(type(layer).__name__, full is not None, layer.weight.numel()) for layer, full in model._grpo_cpu_gemms]


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
    assert sum(1 for _, full, _ in plan if full) == 8 and all(n == 0 for _, full, n in plan if full)
    assert {name for name, full, _ in plan if not full} == {"VocabParallelEmbedding", "ParallelLMHead"}
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
