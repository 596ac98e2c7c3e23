"""Whether the installed vLLM can serve LoRA adapters for a model architecture, answered before
any actor starts without importing vLLM (its import costs ~4 s of start-up on 2 cores): the
model registry's source names the module and class of each architecture, and the class (or a
base class, followed through the module's imports) lists `SupportsLoRA` among its bases, the
interface vLLM checks (`vllm.model_executor.models.interfaces.supports_lora`).

Fails open: an architecture or a base class this reading cannot resolve counts as supported (the
engine then says so itself when the adapter loads). Only a class whose whole base chain was read
and never names SupportsLoRA is refused.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os

UNKNOWN = None  # the answer when the source could not settle it


@functools.lru_cache(maxsize=1)
def _models_dir() -> str | None:
    spec = importlib.util.find_spec("vllm")  # finds the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model_executor", "models")
    return path if os.path.isdir(path) else None


@functools.lru_cache(maxsize=64)
def _parse(module: str) -> ast.Module | None:
    folder = _models_dir()
    try:
        with open(os.path.join(folder, module + ".py")) as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, TypeError):
        return None


def registry_entry(architecture: str) -> tuple[str, str] | None:
    """(module, class) of `architecture` in vLLM's registry of text-generation models."""
    tree = _parse("registry")
    for node in tree.body if tree else ():
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == architecture and isinstance(value, ast.Tuple):
                    parts = [e.value for e in value.elts if isinstance(e, ast.Constant)]
                    if len(parts) == 2:
                        return parts[0], parts[1]
    return None


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


TERMINAL = {"Module", "object", "Protocol", "Generic", "ABC"}  # bases that are known not to bring LoRA


def class_supports_lora(module: str, name: str, depth: int = 0) -> bool | None:
    """True / False when the source settles it, UNKNOWN otherwise."""
    tree = _parse(module)
    if tree is None or depth > 8:
        return UNKNOWN
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:
        return UNKNOWN
    on_module = _flag(tree.body, lambda t: isinstance(t, ast.Attribute) and _base_name(t.value) == name)
    flag = on_module if on_module is not None else _flag(cls.body, lambda t: isinstance(t, ast.Name))
    if flag is not None:  # supports_lora = True/False on the class, or on it at module level
        return flag
    answer = False
    for node in cls.bases:
        base = _base_name(node)
        if base is None:  # Base[T], a call, *bases: not read
            answer = UNKNOWN
            continue
        if base == "SupportsLoRA":
            return True
        if base in TERMINAL:
            continue
        where = _defined_in(tree, module, base)
        got = class_supports_lora(where, base, depth + 1) if where else UNKNOWN
        if got:
            return True
        if got is UNKNOWN:
            answer = UNKNOWN
    return answer


def _flag(body: list[ast.stmt], is_target) -> bool | None:
    """The constant a `supports_lora = ...` assignment in `body` sets (targets chosen by is_target)."""
    for n in body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            named = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if named == "supports_lora" and is_target(t) and isinstance(n.value, ast.Constant):
                return bool(n.value.value)
    return None


def _defined_in(tree: ast.Module, module: str, name: str) -> str | None:
    """The models module that defines `name` as seen from `module`: itself, or an import from a
    sibling module (relative, or absolute under vllm.model_executor.models)."""
    if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
        return module
    prefix = "vllm.model_executor.models."
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom) or not node.module \
                or not any((a.asname or a.name) == name == a.name for a in node.names):
            continue
        if node.level == 1:
            return node.module
        if node.level == 0 and node.module.startswith(prefix):
            return node.module[len(prefix):]
    return None


def lora_problem(architectures: list[str]) -> str | None:
    """Why vLLM cannot serve an adapter for a model of these architectures (None: it can, or the
    source does not tell)."""
    for arch in architectures:
        entry = registry_entry(arch)
        if entry and class_supports_lora(*entry) is False:
            return (f"vLLM cannot serve LoRA adapters for {arch} (its {entry[1]} does not implement SupportsLoRA), "
                    "so model.lora.sync=adapter cannot load the adapter into the generators; use "
                    "model.lora.sync=merged (the generators get merged weights, no LoRA kernels)")
    return None
