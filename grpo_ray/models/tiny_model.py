"""Build a tiny Qwen2-style causal LM and a byte-level BPE tokenizer offline, saved with
`save_pretrained`, so tests and the default job need no model hub.

The result is an ordinary Hugging Face model folder: the trainer, vLLM and transformers load it
exactly as they would load Qwen2.5-1.5B. head_dim must be one vLLM's CPU attention supports
(32, 64, 80, ...; 16 fails), hence hidden_size / num_heads >= 32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

EOS = "<|endoftext|>"
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class TinyShape:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 512  # target for BPE training; the model uses the tokenizer's real size
    max_position_embeddings: int = 512


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """Byte-level BPE (as Qwen2/GPT-2) with single-digit pre-tokenization (as LLaMA/Qwen), so
    numbers are spelled digit by digit and arithmetic stays learnable for a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_tiny_model(out_dir: str, corpus: list[str], shape: TinyShape | None = None, seed: int = 0) -> str:
    """Create a random-initialised Qwen2ForCausalLM + tokenizer in out_dir; returns out_dir."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = shape or TinyShape()
    head_dim = shape.hidden_size // shape.num_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS or shape.hidden_size % shape.num_heads:
        from ..config import ConfigError

        raise ConfigError(
            f"model.hidden_size={shape.hidden_size} / model.num_heads={shape.num_heads} gives head_dim "
            f"{shape.hidden_size / shape.num_heads:g}; vLLM on CPU supports {VLLM_CPU_HEAD_DIMS}"
        )
    tokenizer = build_tokenizer(corpus, shape.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
