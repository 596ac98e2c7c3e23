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


def response_logprobs(model, batch: TrainBatch, with_entropy: bool = False, entropy_grad: bool = False):
    """Per-token log p(response token) under `model`.

    Returns logprobs [B, T] (float32, with grad if the model has it) and entropy [B, T] (detached
    unless entropy_grad, which an entropy bonus needs) or None. Position ids come from the
    attention mask, so left-padded prompts get the same positions as the unpadded sequence vLLM
    saw (logprobs match to ~1e-6 in float32).
    """
    batch = batch.to(next(model.parameters()).device)
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids, use_cache=False)
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    logits = out.logits[:, P - 1:P + T - 1]  # [B, T, V]: position t predicts token t+1
    logprobs = token_logprobs(logits, batch.response_ids)
    entropy = None
    if with_entropy and entropy_grad:
        entropy = entropy_from_logits(logits)
    elif with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logprobs, entropy


@torch.no_grad()
def batched_logprobs(model, batch: TrainBatch, micro_batch_size: int) -> torch.Tensor:
    """logprobs [B, T] of the batch's responses, micro-batch by micro-batch (0 on padding)."""
    out = torch.zeros_like(batch.old_logprobs)
    for start in range(0, batch.size, micro_batch_size):
        mb = batch.select(slice(start, start + micro_batch_size))
        lp, _ = response_logprobs(model, mb)
        out[start:start + mb.size, :lp.shape[1]] = lp.cpu() * mb.response_mask
    return out
