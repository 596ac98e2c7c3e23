"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT: wrap the policy, fold the adapter into the
base weights for the generators and final_model/, and write the adapter in PEFT's own format
(final_adapter/, checkpoints, adapter-only sync to vLLM).

The base weights are never changed: merged weights are computed as W + scale * B @ A beside them
(PEFT's merge_adapter() followed by unmerge_adapter() leaves rounding in W, and the reference
logprobs come from the base with the adapter off).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

ADAPTER = "default"  # PEFT's name for a model's one adapter


@dataclass(frozen=True)
class LoraSettings:
    """model.lora (config.sections.ModelLoraConfig) as the learner gets it."""
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def wrap(model: torch.nn.Module, s: LoraSettings) -> torch.nn.Module:
    """The model with a fresh adapter (B = 0, so the wrapped model computes what the base does);
    only the adapter's parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    if problem := target_problem(model, s.target_modules):
        raise ValueError(problem)
    config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                        target_modules=list(s.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def target_problem(model: torch.nn.Module, targets) -> str | None:
    """What is wrong with model.lora.target_modules for this model (None: nothing)."""
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n, _ in model.named_modules())]
    if not missing:
        return None
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return f"model.lora.target_modules: {missing} match no layer of this model; its linear layers are {names}"


def check_targets(model_path: str, targets) -> None:
    """target_problem on the driver, before any actor starts: the model built on the meta device
    (no weights read), so this costs no memory whatever its size. Raises ConfigError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import ConfigError

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    if problem := target_problem(model, targets):
        raise ConfigError(problem)


def check_serving(model_path: str) -> None:
    """model.lora.sync=adapter: vLLM must serve LoRA for the model's architecture (read from
    vLLM's source, without importing it: models/vllm_support.py). Raises ConfigError."""
    from ..config import ConfigError
    from .modeling import read_model_config
    from .vllm_support import lora_problem

    if problem := lora_problem(list(read_model_config(model_path).get("architectures") or [])):
        raise ConfigError(f"{problem} (model.path={model_path!r})")


def is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def trainable_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a ZeRO-3 partitioned parameter by its whole size (ds_numel)."""
    sizes = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in module.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


@torch.no_grad()
def merged_state_dict(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights with the adapter folded in, under the base model's own names
    (what transformers and vLLM load); `module` is left as it is."""
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    deltas = {f"{name}.weight": layer for name, layer in base.named_modules()
              if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if name in deltas:
            delta = deltas[name].get_delta_weight(ADAPTER)
            tensor = (tensor.float() + delta.float()).to(tensor.dtype)
        yield name, tensor


def save_merged(module: torch.nn.Module, out_dir: str) -> None:
    """A Hugging Face folder of the merged model (no PEFT needed to load it)."""
    base = module.get_base_model()
    base.save_pretrained(out_dir, state_dict={k: v.detach().contiguous() for k, v in merged_state_dict(module)})


def adapter_files(module: torch.nn.Module) -> dict[str, bytes]:
    """The adapter as PEFT's save_pretrained writes it: adapter_model.safetensors (keys without the
    adapter name, as vLLM and PEFT expect) and adapter_config.json."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
    config = module.peft_config[ADAPTER].to_dict()
    return {"adapter_model.safetensors": save(state),
            "adapter_config.json": json.dumps(config, default=sorted, indent=1).encode()}


def write_adapter(files: dict[str, bytes], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)


def base_only(module: torch.nn.Module):
    """Context: the adapter off (the frozen base: the reference policy of a LoRA run)."""
    return module.disable_adapter()


def is_adapter_dir(path: str) -> bool:
    """A PEFT adapter folder (adapter_config.json), as final_adapter/ and checkpoints' adapter/."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def merged_from_adapter(adapter_dir: str, cache_root: str, log=print) -> str:
    """The model an adapter folder stands for, as a Hugging Face folder (its base, named by
    adapter_config.json's base_model_name_or_path, with the adapter folded in and the base's
    tokenizer), built once per adapter under cache_root and written atomically."""
    import hashlib
    import shutil

    from peft import PeftModel

    from .modeling import ModelDirError, load_causal_lm, load_tokenizer

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path") or ""
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ModelDirError(f"the adapter in {adapter_dir} names its base model {base!r} (base_model_name_or_path in "
                            "adapter_config.json), which is not a model folder here; put the base there, or edit "
                            "that field to where it is")
    digest = hashlib.sha256(os.path.abspath(base).encode())
    for name in sorted(os.listdir(adapter_dir)):
        if name.startswith("adapter_"):
            with open(os.path.join(adapter_dir, name), "rb") as f:
                digest.update(name.encode() + f.read())
    out = os.path.join(cache_root, f"merged-{digest.hexdigest()[:12]}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    log(f"merging the adapter {adapter_dir} into its base {base} -> {out}")
    model = PeftModel.from_pretrained(load_causal_lm(base), adapter_dir).merge_and_unload()
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(base).save_pretrained(tmp)
    os.replace(tmp, out)
    return out
