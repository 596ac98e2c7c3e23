"""Loading a Hugging Face causal LM and the one forward pass the reference and learner share."""
from __future__ import annotations

import os

import torch

from .algorithm import entropy_from_logits, token_logprobs
from .records import TrainBatch

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
    P = batch.prompt_len
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    U = int(inverse.max()) + 1
    if 2 * U > batch.size:
        return None
    rows = torch.arange(batch.size, device=inverse.device)
    first = torch.full((U,), batch.size, dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def response_logits(model, batch: TrainBatch, share_prompts: bool = True) -> torch.Tensor:
    """Logits [B, T, V] at the positions that predict the response tokens (position t predicts
    token t+1), with the lm head applied to those positions only.

    share_prompts: GRPO samples group_size completions of each prompt, so the prompt's forward
    pass is the same for all of them. It runs once per distinct prompt, and the completions
    attend to its key/value cache, indexed out to every row (gradients flow back through the
    index into the one prompt pass, summing over the group, as they would over G copies).
    With a 100-token prompt and 200-token completions at G=16 that is a third fewer tokens
    through the model (Prefix Grouper, Liu et al. 2025, arXiv:2506.05433). Same logits as
    the plain pass to float rounding (tests/test_records_and_sync.py)."""
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    groups = _prompt_groups(batch) if share_prompts else None
    if groups is None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=T + 1)
        return out.logits[:, :T]
    first, inverse = groups
    head = model(input_ids=batch.input_ids[first, :P], attention_mask=batch.attention_mask[first, :P],
                 position_ids=position_ids[first, :P], use_cache=True, logits_to_keep=1)
    logits = head.logits[inverse]  # [B, 1, V]: the last prompt position predicts response token 0
    if T == 1:
        return logits
    cache = head.past_key_values
    cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...], differentiable indexing
    tail = model(input_ids=batch.input_ids[:, P:P + T - 1], attention_mask=batch.attention_mask[:, :P + T - 1],
                 position_ids=position_ids[:, P:P + T - 1], past_key_values=cache, use_cache=True)
    return torch.cat([logits, tail.logits], dim=1)


def response_logprobs(model, batch: TrainBatch, with_entropy: bool = False, entropy_grad: bool = False,
                      share_prompts: bool = True):
    """Per-token log p(response token) under `model`.

    Returns logprobs [B, T] (float32, with grad if the model has it) and entropy [B, T] (detached
    unless entropy_grad, which an entropy bonus needs) or None. Position ids come from the
    attention mask, so left-padded prompts get the same positions as the unpadded sequence vLLM
    saw (logprobs match to ~1e-6 in float32).
    """
    batch = batch.to(next(model.parameters()).device)
    logits = response_logits(model, batch, share_prompts)
    logprobs = token_logprobs(logits, batch.response_ids)
    entropy = None
    if with_entropy and entropy_grad:
        entropy = entropy_from_logits(logits)
    elif with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logprobs, entropy


@torch.no_grad()
def batched_logprobs(model, batch: TrainBatch, micro_batch_size: int, share_prompts: bool = True) -> torch.Tensor:
    """logprobs [B, T] of the batch's responses, micro-batch by micro-batch (0 on padding)."""
    out = torch.zeros_like(batch.old_logprobs)
    for rows, mb in batch.micro_batches(micro_batch_size):
        lp, _ = response_logprobs(model, mb, share_prompts=share_prompts)
        out[rows, :lp.shape[1]] = lp.cpu() * mb.response_mask
    return out
