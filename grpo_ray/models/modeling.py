"""Loading a Hugging Face causal LM and the one forward pass the reference and learner share."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from ..core.algorithm import entropy_from_logits, token_logprobs
from ..core.packing import pack_plan
from ..core.records import TrainBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelDirError(ValueError):
    """A model folder that cannot be trained or evaluated (the message names the folder, what is
    wrong, and the fix): raised before any actor starts, printed by the CLI as one line."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
PROBE_PROMPT = "What is 12 + 30? Answer: "


def check_model_dir(path: str, max_model_len: int | None = None, tokenizer: bool = True,
                    tensor_parallel: int = 1) -> None:
    """Everything a run needs from a Hugging Face model folder, checked on the driver before any
    actor starts (these failed tens of seconds later, inside vLLM, as long Ray tracebacks): a
    config.json that is JSON, weight files (every shard an index names), a tokenizer that loads
    and encodes a prompt to at least one token (transformers builds an empty one for a folder
    without tokenizer files), and max_model_len (rollout.max_model_len) within the model's
    context, and rollout.tensor_parallel against its heads. Raises ModelDirError."""
    config = read_model_config(path)
    check_weights(path)
    check_tensor_parallel(path, tensor_parallel, config)
    if max_model_len is not None:
        limit = model_context_len(config)
        if limit is not None and max_model_len > limit:
            raise ModelDirError(
                f"rollout.max_model_len={max_model_len} is above the context of the model in {path} "
                f"({limit} positions, max_position_embeddings in its config.json); set rollout.max_model_len={limit} "
                "or lower")
    if tokenizer:
        _check_tokenizer(path)


def check_tensor_parallel(path: str, tp: int, config: dict | None = None) -> None:
    """rollout.tensor_parallel against the model's heads, as vLLM shards them: the attention heads
    split evenly over the workers, the KV heads too (or, fewer than the workers, each replicated
    to a whole number of them). ModelDirError names the key and the model's counts. config: its
    config.json when already read."""
    config = config or read_model_config(path)
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if tp <= 1 or not heads:
        return
    if heads % tp or (kv % tp if kv >= tp else tp % kv):
        fits = [n for n in range(1, heads + 1) if not heads % n and not (kv % n if kv >= n else n % kv)]
        raise ModelDirError(f"rollout.tensor_parallel={tp} does not divide the attention heads of the model in {path} "
                            f"({heads} heads, {kv} KV heads); vLLM shards them evenly over the workers: use one of "
                            f"{fits}")


def read_model_config(path: str) -> dict:
    """path/config.json as a dict; ModelDirError when the folder or the file is missing or not JSON."""
    if not os.path.isdir(path):
        raise ModelDirError(f"model.path={path!r} is not a folder; build one with `grpo-ray build-model DIR` or "
                            "point model.path at a saved Hugging Face model")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelDirError(
            f"model.path={path!r} is not a Hugging Face model folder (no config.json); "
            "build one with `grpo-ray build-model DIR` or point model.path at a saved model"
        )
    try:
        with open(file) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{file} is not valid JSON ({e}); save the model again with "
                            "model.save_pretrained(folder), or repair the file") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{file} holds a {type(config).__name__}, not a JSON object of model settings")
    return config


def check_weights(path: str) -> None:
    """The folder has weights vLLM and transformers can load, and every shard its index names."""
    names = set(os.listdir(path))
    for index in sorted(n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json"))):
        try:
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelDirError(f"{os.path.join(path, index)} is not a weight index ({type(e).__name__}: {e}); "
                                "save the model again with model.save_pretrained(folder)") from None
        missing = [s for s in shards if s not in names]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelDirError(f"model folder {path} lacks {len(missing)} of the {len(shards)} weight shard(s) "
                                f"{index} names: {', '.join(missing[:3])}{more}; finish the download or copy")
        return
    if not any(n.endswith((".safetensors", ".pt")) or (n.endswith(".bin") and n != "training_args.bin")
               for n in names):
        raise ModelDirError(f"model folder {path} has no weights (model.safetensors, model.safetensors.index.json with "
                            "its shards, or pytorch_model.bin); save them with model.save_pretrained(folder)")


def model_context_len(config: dict) -> int | None:
    """The most positions a model takes, from its config.json (a multimodal model's text_config),
    stretched by rope scaling as vLLM stretches it; None when the config does not say."""
    if not any(k in config for k in CONTEXT_KEYS) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    found = [config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)]
    if not found:
        return None
    limit = min(found)
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(rope, dict):
        kind = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        if kind not in (None, "default", "su", "longrope", "llama3", "mrope") and isinstance(factor, (int, float)):
            limit = int(rope.get("original_max_position_embeddings", limit) * factor) if kind == "yarn" else int(
                limit * factor)
    return limit


def load_causal_lm(path: str, dtype: str = "float32"):
    """Any HF causal LM folder, loaded the same way for a tiny test model and Qwen2.5-1.5B."""
    from transformers import AutoModelForCausalLM

    read_model_config(path)
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
    """The folder's tokenizer, checked to encode a prompt to at least one token (ModelDirError)."""
    from transformers import AutoTokenizer

    read_model_config(path)
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise ModelDirError(f"model folder {path} has no tokenizer ({' / '.join(TOKENIZER_FILES[:3])} ...): "
                            f"{_tokenizer_fix(path)}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # the files are the user's: say which folder, and why it failed
        raise _tokenizer_error(path, e) from e
    _check_encodes(path, tok(PROBE_PROMPT)["input_ids"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_tokenizer(path: str) -> None:
    """check_model_dir's tokenizer check, once it has read config.json: load_tokenizer's checks
    without transformers where the folder has a BPE tokenizer.json (a fast tokenizer, which
    transformers loads with the `tokenizers` library): transformers' import was a large part of
    the driver's start-up (benchmarks/RESULTS.md, eighteenth session), and the actors load the
    tokenizer anyway. Where transformers would decide otherwise, its own load_tokenizer checks: a
    folder without tokenizer.json, remote code (auto_map), Mistral's tekken.json, added tokens it
    parses itself, and tokenizer models other than BPE (for some model types, e.g. qwen2, it
    rebuilds the tokenizer as a BPE from the file's vocabulary)."""
    tokenizer_json, config_json = (os.path.join(path, n) for n in ("tokenizer.json", "tokenizer_config.json"))
    try:
        with open(config_json, encoding="utf-8") if os.path.isfile(config_json) else contextlib.nullcontext() as f:
            config = json.load(f) if f else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"model folder {path}: tokenizer_config.json is not JSON ({e}); "
                            f"{_tokenizer_fix(path)}") from None
    if (not os.path.isfile(tokenizer_json) or not isinstance(config, dict) or "auto_map" in config
            or os.path.isfile(os.path.join(path, "tekken.json")) or not _plain_added_tokens(config)):
        load_tokenizer(path)
        return
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:
        raise _tokenizer_error(path, e) from e
    if type(tok.model).__name__ != "BPE":
        load_tokenizer(path)
        return
    _check_encodes(path, tok.encode(PROBE_PROMPT).ids)


def _plain_added_tokens(config: dict) -> bool:
    """tokenizer_config.json's added_tokens_decoder as save_pretrained writes it: {"<id>": {"content": ...}}."""
    added = config.get("added_tokens_decoder", {})
    return isinstance(added, dict) and all(k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)
                                           for k, v in added.items())


def _tokenizer_fix(path: str) -> str:
    return f"save the tokenizer there with tokenizer.save_pretrained({path!r})"


def _tokenizer_error(path: str, e: Exception) -> ModelDirError:
    """The files are the user's: say which folder, and why its tokenizer failed to load."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ModelDirError(f"model folder {path}: its tokenizer does not load ({type(e).__name__}: {first}); "
                         f"{_tokenizer_fix(path)}")


def _check_encodes(path: str, ids: list[int]) -> None:
    if not ids:
        raise ModelDirError(f"model folder {path}: its tokenizer encodes {PROBE_PROMPT!r} to no tokens (no vocabulary "
                            f"in its tokenizer files?); {_tokenizer_fix(path)}")


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
