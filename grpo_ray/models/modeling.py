"""Loading a Hugging Face causal LM and the one forward pass the reference and learner share."""
from __future__ import annotations

import os

import torch

from ..core.algorithm import entropy_from_logits, token_logprobs
from ..core.packing import pack_plan
from ..core.records import TrainBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.path={path!r} is not a Hugging Face model folder (no config.json); "
            "build one with `grpo-ray build-model DIR` or point model.path at a saved model"
        )


def load_causal_lm(path: str, dtype: str = "float32"):
    """Any HF causal LM folder, loaded the same way for a tiny test model and Qwen2.5-1.5B."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])


def disable_dropout(model) -> None:
    """No dropout in the policy (TRL's GRPOConfig.disable_dropout): the sampler and the stored
    old_logprobs have none, so with it the ratio would not start at 1 and the noise would be
    clipped as if it were policy change (GPT-2-style configs drop 10%). Covers nn.Dropout and
    the float `attention_dropout` that HF attention modules read at call time."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def device() -> torch.device:
    """This actor's device: the GPU Ray assigned it (CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _prompt_groups(batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows that share a prompt (GRPO's group_size completions per prompt): (first [U], one row
    per distinct prompt; inverse [B], row -> its prompt's index in first), or None when fewer
    than half the rows repeat a prompt (one forward over the whole batch is cheaper then)."""
    inverse = batch.prompt_index()
    U = int(inverse.max()) + 1
    if 2 * U > batch.size:
        return None
    rows = torch.arange(batch.size, device=inverse.device)
    first = torch.full((U,), batch.size, dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def response_logits(model, batch: TrainBatch, share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] at the positions that predict response tokens, and index [N]: the flat
    position in [B, T] of the token each row predicts. The lm head runs on those positions only.

    share_prompts: GRPO samples group_size completions of each prompt, so the prompt's forward
    pass is the same for all of them. It runs once per distinct prompt, and the completions,
    packed end to end (grpo_ray/core/packing.py), attend to its key/value cache (gradients flow back
    through the index into the one prompt pass, summing over the group, as they would over G
    copies). No padding between completions, and no prompt repeated (on a saved step of the tiny
    benchmark, ~1,500 fed tokens in place of 2,816 padded response slots). Same logits as the
    plain pass to float rounding (tests/test_records_and_sync.py)."""
    B, P, T = batch.size, batch.prompt_len, batch.response_mask.shape[1]
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    attn = getattr(getattr(model, "module", model).config, "_attn_implementation", None)  # DeepSpeed wraps
    groups = _prompt_groups(batch) if share_prompts and attn in ("sdpa", "eager") else None
    if groups is None:  # flash attention takes no 4-D mask
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=T + 1)
        return out.logits[:, :T].flatten(0, 1), torch.arange(B * T, device=batch.input_ids.device)
    first, inverse = groups
    head = model(input_ids=batch.input_ids[first, :P], attention_mask=batch.attention_mask[first, :P],
                 position_ids=position_ids[first, :P], use_cache=True, logits_to_keep=1)
    plan = pack_plan(batch.input_ids.cpu(), batch.attention_mask.cpu(), P, inverse.cpu()).to(batch.input_ids.device)
    logits, index = [head.logits[plan.first_prompt, 0]], [plan.first_dst]  # the prompt's last position
    if len(plan.src):
        cache = head.past_key_values
        cache.batch_select_indices(plan.row_prompt)  # [U, ...] -> [R, ...], differentiable indexing
        mask = plan.mask if attn == "sdpa" else torch.zeros(plan.mask.shape, dtype=head.logits.dtype,
                                                            device=plan.mask.device).masked_fill(
            ~plan.mask, torch.finfo(head.logits.dtype).min)  # eager adds the mask to the scores
        tail = model(input_ids=plan.input_ids, attention_mask=mask, position_ids=plan.position_ids,
                     past_key_values=cache, use_cache=True)
        logits.append(tail.logits.flatten(0, 1)[plan.src])
        index.append(plan.dst)
    return torch.cat(logits), torch.cat(index)


def response_logprobs(model, batch: TrainBatch, with_entropy: bool = False, entropy_grad: bool = False,
                      share_prompts: bool = True, temperature: float = 1.0):
    """Per-token log p(response token) under `model` at the sampling temperature: the policy
    that sampled is softmax(logits / T), and the ratio and the KL are about that policy (as in
    TRL's and verl's learners); the generator reports vLLM's logprobs after the same scaling.

    Returns logprobs [B, T] (float32, with grad if the model has it; 0 on padding) and entropy
    [B, T] (detached unless entropy_grad, which an entropy bonus needs) or None. Position ids
    come from the attention mask, so left-padded prompts get the same positions as the unpadded
    sequence vLLM saw (logprobs match to ~1e-6 in float32).
    """
    batch = batch.to(next(model.parameters()).device)
    shape = batch.response_mask.shape
    logits, index = response_logits(model, batch, share_prompts)
    if temperature != 1.0:  # in float32, as vLLM's sampler: bf16 logits / T rounded again (0.02 nats a token)
        logits = logits.float() / temperature
    logprobs = _scatter(token_logprobs(logits, batch.response_ids.reshape(-1)[index]), index, shape)
    entropy = None
    if with_entropy and entropy_grad:
        entropy = _scatter(entropy_from_logits(logits), index, shape)
    elif with_entropy:
        with torch.no_grad():
            entropy = _scatter(entropy_from_logits(logits.detach()), index, shape)
    return logprobs, entropy


def _scatter(values: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """values [N] placed at flat positions index [N] of a zero [B, T] tensor (differentiable)."""
    return values.new_zeros(shape.numel()).scatter(0, index, values).view(shape)


@torch.no_grad()
def batched_logprobs(model, batch: TrainBatch, micro_batch_size: int, share_prompts: bool = True,
                     temperature: float = 1.0) -> torch.Tensor:
    """logprobs [B, T] of the batch's responses at `temperature`, micro-batch by micro-batch (0 on padding)."""
    out = torch.zeros_like(batch.old_logprobs)
    for rows, mb in batch.micro_batches(micro_batch_size, by_prompt=share_prompts):
        lp, _ = response_logprobs(model, mb, share_prompts=share_prompts, temperature=temperature)
        out[rows, :lp.shape[1]] = lp.cpu() * mb.response_mask
    return out
