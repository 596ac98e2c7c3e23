"""The built-in base model: a tiny Qwen2 built offline, then warm-started with a short
supervised pass on its task (arithmetic, or multiply with a Python tool).

GRPO improves a policy that is sometimes right; a random model never is, so its groups all score
0 and every advantage is 0. The warm start makes a base model that can reason but often does
not. For its first 80% of steps every example is careful and shows its work
(' 37+48=85 #### 85', always right), which teaches the arithmetic. The last 20% keep the careful
style in only a `show_work` fraction of examples; the rest are hasty (' #### 61'), with a random
guess as the answer in a `label_noise` fraction of them (random rather than near misses, so the
hasty examples do not blur the arithmetic the careful ones teach). Held-out pass@1 starts around
20-40%; GRPO learns that showing the work pays (the first response token decides), so reward and
response length rise together, as in DeepSeek-R1-Zero. The result is cached by a hash of
everything that shapes it.

With warmstart.subtract > 0, that share of every batch is a subtraction (' 48-37=11 #### 11',
work always shown): a second skill the base has and GRPO on additions does not train, which a
retention set (eval.sets: {task: subtract, retention: true}) watches for being lost.

The multiply task (data.task=multiply, multi-turn tool use) works the same way: for the first 80%
of steps every example calls the Python tool (turn 1 ' ```python\\nprint(a*b)\\n```\\n```output',
the environment's observation '\\n<product>\\n```\\n' with no loss, turn 2 ' #### <product>'), which
teaches copying the operands into the code and the tool's output into the answer; the last 20%
keep the tool in a `show_work` fraction of examples and guess (' #### <random number with as many
digits>', a `label_noise` fraction random, the rest exact) in the others, the guess's digits at a
reduced loss weight (GUESS_DIGIT_WEIGHT). Each segment is tokenised on its own and the ids
concatenated, exactly as a generator sees them. Sampled held-out pass@1 starts around 25%, ~95%
when the tool is called (benchmarks/tune_tool_warmstart.py); GRPO learns to call it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time

from ..data.tasks import (arithmetic_response, arithmetic_work, guess_turn, multiply_guess, subtract_records,
                          tokenizer_corpus, tool_answer_turn, tool_call_turn, tool_observation)
from .tiny_model import TinyShape, build_tiny_model



def _sft_batch(tokenizer, records, rng, ws, max_operand, show_work):
    import torch

    seqs = []
    for r in records:
        answer = int(r["answer"])
        if r.get("op") == "-" or rng.random() < show_work:  # subtractions (warmstart.subtract) always careful
            response = arithmetic_response(answer, arithmetic_work(r))
        else:
            guess = rng.randint(0, 2 * max_operand) if rng.random() < ws.label_noise else answer
            response = arithmetic_response(guess)
        prompt = tokenizer(r["prompt"])["input_ids"]
        completion = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((prompt, completion))
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), L), -100)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)  # loss on the completion only
        mask[i, :n] = 1
    return ids, mask, labels


def multiply_segments(tokenizer, record: dict, use_tool: bool, guess: int | None = None,
                      guess_digit_weight: float = 1.0) -> list[tuple[list[int], list[float]]]:
    """One multiply trajectory as (token ids, loss weights) segments, each tokenised on its own as
    a generator produces them: prompt (weight 0), turn 1, observation (weight 0: the environment
    writes it), turn 2 + EOS; or prompt, guess + EOS, the guess's digits weighted
    `guess_digit_weight`."""
    def enc(text):
        return tokenizer(text)["input_ids"]

    def weighted(ids, w=1.0):
        return ids, [w] * len(ids)

    a, b, eos = record["a"], record["b"], [tokenizer.eos_token_id]
    segments = [weighted(enc(record["prompt"]), 0.0)]
    if use_tool:
        product = a * b
        segments += [weighted(enc(tool_call_turn(a, b))), weighted(enc(tool_observation(str(product))), 0.0),
                     weighted(enc(tool_answer_turn(product)) + eos)]
    else:
        ids = enc(guess_turn(a * b if guess is None else guess)) + eos
        digits = [t.isdigit() for t in tokenizer.convert_ids_to_tokens(ids)]
        segments.append((ids, [guess_digit_weight if d else 1.0 for d in digits]))
    return segments


def segment_batch(tokenizer, sequences: list[list[tuple[list[int], list[float]]]]):
    """Right-padded (ids, mask, labels, weights) from segmented sequences; labels are -100 where
    the weight is 0."""
    import torch

    L = max(sum(len(ids) for ids, _ in segs) for segs in sequences)
    ids = torch.full((len(sequences), L), tokenizer.pad_token_id)
    labels = torch.full((len(sequences), L), -100)
    weights = torch.zeros((len(sequences), L))
    mask = torch.zeros((len(sequences), L), dtype=torch.long)
    for i, segs in enumerate(sequences):
        pos = 0
        for seg, w in segs:
            n = len(seg)
            ids[i, pos:pos + n] = torch.tensor(seg)
            weights[i, pos:pos + n] = torch.tensor(w)
            labels[i, pos:pos + n] = torch.where(weights[i, pos:pos + n] > 0, torch.tensor(seg), -100)
            pos += n
        mask[i, :pos] = 1
    return ids, mask, labels, weights


def weighted_lm_loss(model, ids, mask, labels, weights):
    """Next-token cross-entropy, each target weighted; the weighted mean over the targets."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                         reduction="none")
    w = weights[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


# multiply: the share of steps in which every example calls the tool; the mix follows. A shorter mix
# (0.9, 0.95) or a longer one (0.5, 0.25) both left the copying worse (benchmarks/tune_tool_warmstart.py).
MULTIPLY_TOOL_PHASE = 0.8
# multiply: loss weight of a guess's digits. Random digits are targets that never fit: at full weight
# their gradients keep blurring the copying of the tool's output after ' #### ' (accuracy with the
# tool 0.87-0.90 at weight 1, 0.93-0.96 at 0.3, over 3 seeds). The ' ####' decision token and EOS
# keep weight 1, so the guessing share of first tokens is learnt as before.
GUESS_DIGIT_WEIGHT = 0.3


def _multiply_sft_batch(tokenizer, records, rng, ws, tool_fraction):
    seqs = []
    for r in records:
        if rng.random() < tool_fraction:
            seqs.append(multiply_segments(tokenizer, r, True))
        else:
            guess = multiply_guess(r["a"], r["b"], rng) if rng.random() < ws.label_noise else r["a"] * r["b"]
            seqs.append(multiply_segments(tokenizer, r, False, guess, GUESS_DIGIT_WEIGHT))
    return segment_batch(tokenizer, seqs)


def supervised_warm_start(model_dir: str, train_records: list[dict], ws, seed: int, max_operand: int,
                          log=print, task: str = "arithmetic", subtractions: list[dict] = ()) -> None:
    """Fine-tune the model in model_dir in place (AdamW, linear warm-up then decay).
    subtractions: records a warmstart.subtract share of each batch is drawn from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr)
    start = time.time()
    for step in range(ws.steps):
        for g in opt.param_groups:
            g["lr"] = ws.lr * min(1.0, (step + 1) / 50) * (1.0 - step / ws.steps)
        batch = rng.sample(train_records, min(ws.batch_size, len(train_records)))
        if subtractions:  # a second skill (warmstart.subtract) in a fixed share of every batch
            n = round(ws.subtract * len(batch))
            batch = batch[n:] + rng.sample(subtractions, min(n, len(subtractions)))
        fraction = 1.0 if step < (MULTIPLY_TOOL_PHASE if task == "multiply" else 0.8) * ws.steps else ws.show_work
        if task == "multiply":
            loss = weighted_lm_loss(model, *_multiply_sft_batch(tokenizer, batch, rng, ws, fraction))
        else:
            ids, mask, labels = _sft_batch(tokenizer, batch, rng, ws, max_operand, fraction)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 200 == 0 or step == ws.steps - 1:
            log(f"warm start: step {step + 1}/{ws.steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    model.save_pretrained(model_dir)


def builtin_model(cfg, train_records: list[dict], cache_root: str, log=print) -> str:
    """Path of the warm-started builtin:tiny model, built once per configuration."""
    # model.lora trains on top of the base, it does not make it: a LoRA run starts from the same one
    model = {k: v for k, v in vars(cfg.model).items() if k != "lora"}
    # multiply warm-starts on its own task; every other task (arithmetic, jsonl) on arithmetic, with
    # the key it always had (no "task" entry), so existing cached bases stay valid
    task = "multiply" if getattr(cfg.data, "task", "arithmetic") == "multiply" else "arithmetic"
    # warmstart.subtract=0 (the default) stays out of the key: bases cached before it existed stay valid
    warmstart = {k: v for k, v in vars(cfg.warmstart).items() if k != "subtract" or v}
    fields = {"model": model, "warmstart": warmstart,
              "max_operand": cfg.data.max_operand, "eval_fraction": cfg.data.eval_fraction,
              "seed": cfg.run.seed, "version": 5}
    if task != "arithmetic":
        fields.update(task=task, recipe={"tool_phase": MULTIPLY_TOOL_PHASE, "guess_digit_weight": GUESS_DIGIT_WEIGHT})
    key = json.dumps(fields, sort_keys=True)
    path = os.path.join(cache_root, "builtin-tiny-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if os.path.isfile(os.path.join(path, "done")):
        log(f"base model: {path} (cached)")
        return path
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shape = TinyShape(hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers,
                      num_heads=cfg.model.num_heads, num_kv_heads=max(1, cfg.model.num_heads // 2),
                      intermediate_size=4 * cfg.model.hidden_size)
    build_tiny_model(tmp, tokenizer_corpus(cfg.data.max_operand, task), shape, seed=cfg.run.seed)
    if cfg.warmstart.steps:
        subtractions = (subtract_records(cfg.data.max_operand, cfg.run.seed, cfg.data.eval_fraction)[0]
                        if cfg.warmstart.subtract and task == "arithmetic" else [])
        supervised_warm_start(tmp, train_records, cfg.warmstart, cfg.run.seed, cfg.data.max_operand, log, task,
                              subtractions)
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a crash mid-build never leaves a half model behind the cache key
    log(f"base model: {path}")
    return path
