"""LoRA (issue 24): a PEFT adapter on a frozen base. Fast tests run the real Learner in-process on
a plain-torch backend (test_learner_backend); the slow ones run DeepSpeed ranks, vLLM generators
and the whole loop."""
from __future__ import annotations

import pytest
import torch

from grpo_ray.core.algorithm import loss_normalizer
from grpo_ray.models.modeling import batched_logprobs, load_causal_lm
from test_learner_backend import plain_learner  # noqa: F401 - the fixture
from test_learner_options import _batch
from test_train_loop import _hosted_reference

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]}


def _base(module):
    return {k: v.clone() for k, v in module.state_dict().items() if ".lora_" not in k}


def _update(learner, b, steps=2):
    b.old_logprobs = learner.logprobs(b)
    for _ in range(steps):
        learner.update([b], [loss_normalizer(b.response_mask, "seq_mean")])


def test_an_update_changes_the_adapter_only_and_the_reference_is_the_base(plain_learner, tiny_model_dir):
    learner = plain_learner(lora=LORA, base_reference=True)
    module = learner.backend.module
    trainable, total = learner.parameter_counts()
    assert 0 < trainable < total / 10
    assert all(("lora_" in n) == p.requires_grad for n, p in module.named_parameters())
    b = _batch(seed=4)
    base = load_causal_lm(tiny_model_dir).eval()
    want = batched_logprobs(base, b, 8, True, 1.0)
    assert torch.equal(learner.reference_logprobs(b), want)  # B = 0 at the start: also the policy's
    before = _base(module)
    _update(learner, b)
    after = _base(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    moved = learner.logprobs(b)
    assert not torch.allclose(moved, want, atol=1e-4)  # the adapter trained...
    assert torch.equal(learner.reference_logprobs(b), want)  # ...and the reference is still the base, exactly


def test_the_learner_fills_in_the_kl_reference_itself(plain_learner):
    """A LoRA run has no reference actor: the batches come without ref_logprobs and the loss still
    has its KL term (a kl metric), measured against the base."""
    learner = plain_learner(lora=LORA, base_reference=True)
    learner.loss_kwargs["beta"] = 0.5
    b = _batch(seed=6)
    b.old_logprobs = learner.logprobs(b)
    first = learner.update([b], [loss_normalizer(b.response_mask, "seq_mean")])
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == base before the first step
    second = learner.update([b], [loss_normalizer(b.response_mask, "seq_mean")])
    assert second["kl"] > 1e-6
    assert b.ref_logprobs is None  # the batch handed in is left as it was


def test_merged_weights_and_saved_folders_give_the_policys_logprobs(plain_learner, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo_ray.roles.weight_sync import unpack_bucket

    learner = plain_learner(lora=LORA, base_reference=True)
    b = _batch(seed=7)
    _update(learner, b, steps=3)
    want = learner.logprobs(b)
    # the generators' weights: the base's own names, the adapter folded in
    weights = dict(item for bucket in learner.weight_buckets() for item in unpack_bucket(bucket))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    learner.save_pretrained(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # plain transformers, no PEFT
    assert set(merged.state_dict()) <= set(weights) | {"lm_head.weight"}
    assert torch.allclose(batched_logprobs(merged, b, 8, True, 1.0), want, atol=1e-5)
    merged.load_state_dict(weights, strict=False)
    assert torch.allclose(batched_logprobs(merged, b, 8, True, 1.0), want, atol=1e-5)
    learner.save_adapter(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(learner.backend.module.peft_config["default"].base_model_name_or_path)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(batched_logprobs(peft, b, 8, True, 1.0), want, atol=1e-5)


def test_lora_updates_do_not_depend_on_the_micro_batch_split(plain_learner):
    """The aggregation's split invariance holds for the adapter's gradient: one update over micro
    batches of 16 rows or of 4 gives the same adapter (float32 rounding aside)."""
    adapters = []
    for micro in (16, 4):
        learner = plain_learner(lora=LORA, base_reference=True)
        learner.micro_batch_size = micro
        b = _batch(seed=8)
        b.old_logprobs = learner.logprobs(b) + 0.05 * b.response_mask  # ratio != 1: clipping acts on some tokens
        learner.update([b], [loss_normalizer(b.response_mask, "seq_mean")])
        adapters.append({n: p.detach().clone() for n, p in learner.backend.module.named_parameters() if "lora_" in n})
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters[0].items() if "lora_B" in k)


def test_target_modules_that_match_nothing_are_named_before_any_actor(plain_learner, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    from grpo_ray.config import ConfigError, load_config
    from grpo_ray.driver import train as train_mod

    with pytest.raises(ValueError, match=r"model.lora.target_modules: \['qkv'\] match no layer.*q_proj"):
        plain_learner(lora={**LORA, "target_modules": ["q_proj", "qkv"]})

    def no_ray(*a, **k):
        raise AssertionError("Ray started before model.lora.target_modules was checked")

    monkeypatch.setattr(train_mod, "init_ray", no_ray)
    cfg = load_config("configs/default.yaml", [f"model.path={tiny_model_dir}", "model.lora.rank=4",
                                               "model.lora.target_modules=[q_proj,qkv]", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no layer of this model; its linear layers are .*'down_proj'"):
        train_mod.train(cfg)


def test_lora_config_keys_and_refusals():
    from grpo_ray.config import ConfigError, load_config

    cfg = load_config("configs/default.yaml", ["model.lora.rank=8"])
    assert cfg.lora and cfg.needs_reference and not cfg.uses_reference  # no reference actor with LoRA
    assert not load_config("configs/default.yaml").lora
    with pytest.raises(ConfigError, match="algo.ref_reset_every=5 with model.lora.rank=8"):
        load_config("configs/default.yaml", ["model.lora.rank=8", "algo.ref_reset_every=5"])
    with pytest.raises(ConfigError, match="model.lora.rank=-1"):
        load_config("configs/default.yaml", ["model.lora.rank=-1"])
    for bad, needle in ((["model.lora.target_modules=[]"], "name at least one linear layer"),
                        (["model.lora.target_modules=[q_proj,lm_head]"], r"\['lm_head'\]: adapters on the embeddings"),
                        (["model.lora.rank=600", "model.lora.sync=adapter"], "vLLM serves adapters up to rank 512")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/default.yaml", ["model.lora.rank=8", *bad])


def test_a_checkpoint_of_other_lora_settings_is_refused_before_any_actor(tiny_model_dir, tmp_path):
    from grpo_ray.driver.checkpoint import CheckpointError, find_resume
    from test_resume import _fake_checkpoint

    lora = {k: v for k, v in LORA.items()}
    _fake_checkpoint(str(tmp_path), 2, tiny_model_dir)  # saved by a full fine-tuning run
    with pytest.raises(CheckpointError, match="saved with full fine-tuning; this run has model.lora.rank=4"):
        find_resume(str(tmp_path), "auto", tiny_model_dir, lora)
    assert find_resume(str(tmp_path), "auto", tiny_model_dir, None)[1]["step"] == 2
    state = {"version": 1, "step": 4, "sampler": {"epoch": 0, "position": 0},
             "monitor": {"active": [], "recent_kl": []}, "lora": {**lora, "alpha": 16.0}}
    _fake_checkpoint(str(tmp_path), 4, tiny_model_dir, state)
    with pytest.raises(CheckpointError, match="model.lora.alpha=16.0.*this run has.*model.lora.alpha=8.0"):
        find_resume(str(tmp_path), "auto", tiny_model_dir, lora)
    assert find_resume(str(tmp_path), "auto", tiny_model_dir, {**lora, "alpha": 16.0})[1]["step"] == 4


PROMPTS = [f"Q: {a}+{b}=?\nA:" for a, b in [(1, 2), (13, 29), (40, 7), (25, 25)]]


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_after_a_sync_the_generator_samples_the_lora_policy(ray_local, tiny_model_dir, sync):
    """DeepSpeed learner with an adapter, a vLLM generator: after the update and the sync (merged
    weights, or the adapter alone served as a vLLM LoRA), the generator's logprobs are the
    learner's (1e-4, float32); the base's are not."""
    from grpo_ray.core.records import TrainBatch
    from grpo_ray.roles.generator import Generator
    from grpo_ray.roles.learner import Learner

    ray = ray_local
    adapter = sync == "adapter"
    gen = ray.remote(Generator).options(num_cpus=0.25).remote(tiny_model_dir, cpu_threads="0-1", seed=0,
                                                              lora_rank=LORA["rank"] if adapter else 0)
    learner = ray.remote(Learner).options(num_cpus=0.25).remote(
        tiny_model_dir, lr=1e-2, loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta=0.01, aggregation="seq_mean"),
        micro_batch_size=16, master_port=29631 + adapter, lora=LORA, base_reference=True, sync_adapter=adapter)
    try:
        for version in (1, 2):  # the second sync replaces the first adapter
            ro = ray.get(gen.generate.remote(PROMPTS, n=8, temperature=1.0, max_new_tokens=8, seed=version))
            b = TrainBatch.from_rollout(ro, torch.randn(len(ro), generator=torch.Generator().manual_seed(version)),
                                        pad_id=0)
            for _ in range(2):
                stats = ray.get(learner.update.remote([b], [loss_normalizer(b.response_mask, "seq_mean")]))
            assert stats["kl"] > 0 and stats["grad_norm"] > 0
            loaded = ray.get(gen.update_weights.remote(learner.weight_buckets.remote(), version))
            assert loaded == (2 * 7 * 2 if adapter else loaded)  # adapter: A and B of 7 layers x 2 blocks
            ro2 = ray.get(gen.generate.remote(PROMPTS, n=8, temperature=1.0, max_new_tokens=8, seed=10 + version))
            assert ro2.weight_version == version
            b2 = TrainBatch.from_rollout(ro2, torch.zeros(len(ro2)), pad_id=0)
            mask = b2.response_mask
            learner_lp = ray.get(learner.logprobs.remote(b2))
            assert float(((learner_lp - b2.old_logprobs).abs() * mask).max()) < 1e-4
            base_lp = ray.get(learner.reference_logprobs.remote(b2))
            assert float(((base_lp - b2.old_logprobs).abs() * mask).max()) > 1e-3  # the adapter moved the policy
    finally:
        for a in (gen, learner):
            ray.kill(a)


@pytest.mark.slow
def test_the_loop_with_lora_on_two_zero3_ranks(ray_local, tiny_model_dir, tmp_path):
    """No reference actor; the KL against the base; checkpoints with the adapter; final_model/
    merged (plain transformers) and final_adapter/ (PEFT) give the same logprobs."""
    import json
    import os

    from peft import PeftModel
    from ray._private import state
    from transformers import AutoModelForCausalLM

    from grpo_ray.config import load_config
    from grpo_ray.driver.train import train

    def references():
        return sum(a["ActorClassName"] == "Reference" for a in state.actors().values())

    before = references()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=3", "train.eval_every=0",
        "eval.num_prompts=4", "eval.samples=4", "eval.ks=[1,4]", "learner.lr=1e-2", "learner.micro_batch_size=8",
        "learner.num_ranks=2", "learner.zero_stage=3", "algo.beta=0.01", "train.checkpoint_every=2",
        "model.lora.rank=4", "run.plots=false", f"run.output_dir={tmp_path}", "run.name=lora",
        f"model.path={tiny_model_dir}", "data.task=jsonl", f"data.train_path={data}", "data.eval_fraction=0.5"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # against the base
    assert all(abs(r["sampler_kl"]) < 1e-4 for r in rows)  # the generators sample the learner's policy
    assert references() == before  # none was ever created: no actor,
    assert not _hosted_reference(run_dir)  # and no copy in the learner ranks (resources.reference_host)
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_000002", "adapter", "adapter_config.json"))
    b = _batch(seed=9)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_model")).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     os.path.join(run_dir, "final_adapter")).eval()
    want = batched_logprobs(merged, b, 8, True, 1.0)
    assert torch.allclose(batched_logprobs(peft, b, 8, True, 1.0), want, atol=1e-5)
    assert not torch.allclose(batched_logprobs(load_causal_lm(tiny_model_dir), b, 8, True, 1.0), want, atol=1e-4)


def test_an_adapter_folder_is_merged_into_its_base_for_grpo_ray_eval(plain_learner, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from grpo_ray.models.lora import is_adapter_dir, merged_from_adapter
    from grpo_ray.models.modeling import ModelDirError

    learner = plain_learner(lora=LORA, base_reference=True)
    b = _batch(seed=11)
    _update(learner, b)
    learner.save_adapter(str(tmp_path / "adapter"))
    assert is_adapter_dir(str(tmp_path / "adapter")) and not is_adapter_dir(str(tmp_path))
    said = []
    merged = merged_from_adapter(str(tmp_path / "adapter"), str(tmp_path / "cache"), log=said.append)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert torch.allclose(batched_logprobs(model, b, 8, True, 1.0), learner.logprobs(b), atol=1e-5)
    assert (tmp_path / "cache").is_dir() and len(said) == 1
    assert merged_from_adapter(str(tmp_path / "adapter"), str(tmp_path / "cache"), log=said.append) == merged
    assert len(said) == 1  # built once per adapter
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(ModelDirError, match="names its base model '/nowhere/base'"):
        merged_from_adapter(str(tmp_path / "adapter"), str(tmp_path / "cache"))


def _tiny_gpt2(folder) -> str:
    """A GPT-2 model folder (an architecture vLLM serves, but without LoRA support)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpo_ray.data.tasks import tokenizer_corpus
    from grpo_ray.models.tiny_model import build_tokenizer

    tok = build_tokenizer(tokenizer_corpus(9))
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def test_adapter_sync_for_a_model_vllm_serves_no_lora_for_is_refused_before_any_actor(tmp_path, monkeypatch):
    """vLLM 0.32 fails at engine start ("GPT2LMHeadModel does not support LoRA yet") in every
    generator; preflight says so first, without importing vLLM, and points at merged sync."""
    import sys

    from grpo_ray.config import ConfigError, load_config
    from grpo_ray.driver import train as train_mod

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the LoRA support was checked")

    monkeypatch.setattr(train_mod, "init_ray", no_ray)
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    base = [f"model.path={gpt2}", "model.lora.rank=4", "model.lora.target_modules=[c_attn]",
            f"run.output_dir={tmp_path}", "rollout.max_model_len=256"]
    had_vllm = "vllm" in sys.modules
    with pytest.raises(ConfigError, match=r"vLLM cannot serve LoRA adapters for GPT2LMHeadModel .*use "
                                          r"model.lora.sync=merged"):
        train_mod.preflight(load_config("configs/default.yaml", base + ["model.lora.sync=adapter"]), print)
    assert had_vllm or "vllm" not in sys.modules  # read from vLLM's source, not imported
    assert not (tmp_path / "default").exists()  # nothing written
    # merged sync sends whole weights: no LoRA kernels in vLLM, any model it serves will do
    assert train_mod.preflight(load_config("configs/default.yaml", base + ["model.lora.sync=merged"]), print)


def test_the_source_reading_fails_open_on_what_it_cannot_read(monkeypatch):
    """Only a class whose whole base chain was read and never brings LoRA is refused."""
    import ast

    from grpo_ray.models import vllm_support

    sources = {"m": "from .interfaces import SupportsLoRA\nfrom .other import Other\nfrom ext import Ext\n"
                    "class Generic_(Base[int]): pass\nclass Flagged(nn.Module): supports_lora = True\n"
                    "class Later(nn.Module): pass\nLater.supports_lora = True\nclass Plain(nn.Module): pass\n"
                    "class FromSibling(Other): pass\nclass FromElsewhere(Ext): pass\n"
                    "class Off(nn.Module, SupportsLoRA): supports_lora = False\n",
               "other": "class Other(nn.Module, SupportsPP): pass\nfrom .interfaces import SupportsPP\n",
               "interfaces": "class SupportsPP(Protocol): supports_pp = True\n"}
    monkeypatch.setattr(vllm_support, "_parse", lambda m: ast.parse(sources[m]) if m in sources else None)
    got = {c: vllm_support.class_supports_lora("m", c) for c in
           ("Generic_", "Flagged", "Later", "Plain", "FromSibling", "FromElsewhere", "Off", "Missing")}
    assert got == {"Generic_": None, "Flagged": True, "Later": True, "Plain": False, "FromSibling": False,
                   "FromElsewhere": None, "Off": False, "Missing": None}


@pytest.mark.slow
def test_the_lora_support_read_from_vllms_source_is_vllms_own_answer():
    """Every text-generation architecture of the installed vLLM whose class the source reading
    settles: the same answer as vLLM's supports_lora on the loaded class."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS, ModelRegistry

    from grpo_ray.models.vllm_support import class_supports_lora, registry_entry

    settled = {}
    for arch in _TEXT_GENERATION_MODELS:
        mine = class_supports_lora(*registry_entry(arch))
        cls = ModelRegistry._try_load_model_cls(arch) if mine is not None else None
        if cls is not None:
            settled[arch] = (mine, supports_lora(cls))
    assert len(settled) > 50 and {False, True} <= {m for m, _ in settled.values()}
    assert {a: got for a, got in settled.items() if got[0] != got[1]} == {}
    assert settled["Qwen2ForCausalLM"] == (True, True) and settled["GPT2LMHeadModel"] == (False, False)


@pytest.mark.slow
def test_zero3_adapter_sync_gathers_the_adapter_alone(ray_local, tmp_path):
    """model.lora.sync=adapter under ZeRO-3: the ranks gather only the trainable parameters for
    the sync (the frozen base stays partitioned, where before every weight was gathered), and
    rank 0's adapter equals the one read from the whole model."""
    from safetensors.torch import load

    from grpo_ray.data.tasks import tokenizer_corpus
    from grpo_ray.models.tiny_model import TinyShape, build_tiny_model
    from grpo_ray.roles.actors import ACTOR_ENV
    from grpo_ray.roles.learner import Learner

    # MLP weights of 256 x 1024 are above ZeRO-3's persistence threshold (1e5 elements): partitioned
    model = str(tmp_path / "m")
    build_tiny_model(model, tokenizer_corpus(9), TinyShape(hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                                                           intermediate_size=1024), seed=0)
    ray = ray_local
    loss = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean")
    actor = ray.remote(Learner).options(num_cpus=0.25, runtime_env={"env_vars": {**ACTOR_ENV, "DS_ACCELERATOR": "cpu"}})
    ranks = [actor.remote(model, lr=1e-2, loss_kwargs=loss, micro_batch_size=4, zero_stage=3, rank=r,
                          world_size=2, master_port=29661, lora=LORA, sync_adapter=True) for r in range(2)]
    b = _batch(seed=3, rows=8)
    b.old_logprobs = ray.get([r.logprobs.remote(b) for r in ranks])[0]  # ZeRO-3: every rank in each forward
    ray.get([lr.update.remote([b.select(slice(4 * r, 4 * r + 4))], [loss_normalizer(b.response_mask, "seq_mean")])
             for r, lr in enumerate(ranks)])  # the adapter's B is no longer zero

    def whole_inside(trainable_only):
        def look(self):
            outside = {n for n, p in self.backend.module.named_parameters() if not p.data.numel()}
            with self.backend.full_parameters(trainable_only=trainable_only) as module:
                sizes = {n: p.data.numel() for n, p in module.named_parameters()}
                lora = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
            return outside, sizes, lora
        return ray.get([r.__ray_call__.remote(look) for r in ranks])[0]

    partitioned, sizes, _ = whole_inside(True)
    assert any("mlp" in n and "base_layer" in n for n in partitioned), partitioned
    assert all(v > 0 for n, v in sizes.items() if "lora_" in n)
    assert all(sizes[n] == 0 for n in partitioned if "lora_" not in n)  # the frozen base: not gathered
    _, everything, adapter = whole_inside(False)
    assert all(v > 0 for v in everything.values())
    sent = ray.get([r.weight_buckets.remote() for r in ranks])
    assert sent[1] == [] and len(sent[0]) == 1
    tensors = load(sent[0][0].files["adapter_model.safetensors"])
    assert len(tensors) == len(adapter) and any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    for name, t in tensors.items():  # PEFT drops the adapter's name ("default") from its keys
        match = [v for k, v in adapter.items() if k.replace(".default", "").endswith(name.replace("base_model.model.", ""))]
        assert len(match) == 1 and torch.equal(match[0], t), name
    # a save and a load under ZeRO-3 restore the adapter after a further update
    state = str(tmp_path / "state")
    ray.get([r.save_state.remote(state) for r in ranks])
    ray.get([lr.update.remote([b.select(slice(4 * r, 4 * r + 4))], [loss_normalizer(b.response_mask, "seq_mean")])
             for r, lr in enumerate(ranks)])
    assert not all(torch.equal(adapter[k], v) for k, v in whole_inside(False)[2].items())
    ray.get([r.load_state.remote(state) for r in ranks])
    _, _, back = whole_inside(False)
    assert all(torch.equal(adapter[k], v) for k, v in back.items())
