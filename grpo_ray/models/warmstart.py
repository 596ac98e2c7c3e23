"""The built-in base model: a tiny Qwen2 built offline, then warm-started with a short
supervised pass on the arithmetic task.

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
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time

from ..data.tasks import arithmetic_response, arithmetic_work, tokenizer_corpus
from .tiny_model import TinyShape, build_tiny_model



def _sft_batch(tokenizer, records, rng, ws, max_operand, show_work):
    import torch

    seqs = []
    for r in records:
        answer = int(r["answer"])
        if rng.random() < show_work:
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


def supervised_warm_start(model_dir: str, train_records: list[dict], ws, seed: int, max_operand: int,
                          log=print) -> None:
    """Fine-tune the model in model_dir in place (AdamW, linear warm-up then decay)."""
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
        ids, mask, labels = _sft_batch(tokenizer, rng.sample(train_records, min(ws.batch_size, len(train_records))),
                                       rng, ws, max_operand,
                                       1.0 if step < 0.8 * ws.steps else ws.show_work)
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
    key = json.dumps({"model": model, "warmstart": vars(cfg.warmstart),
                      "max_operand": cfg.data.max_operand, "eval_fraction": cfg.data.eval_fraction,
                      "seed": cfg.run.seed, "version": 5}, sort_keys=True)
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
    build_tiny_model(tmp, tokenizer_corpus(cfg.data.max_operand), shape, seed=cfg.run.seed)
    if cfg.warmstart.steps:
        supervised_warm_start(tmp, train_records, cfg.warmstart, cfg.run.seed, cfg.data.max_operand, log)
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a crash mid-build never leaves a half model behind the cache key
    log(f"base model: {path}")
    return path
