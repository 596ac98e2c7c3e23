"""The package's architecture rules, checked by parsing every module under grpo_ray/ with `ast`
(nothing is imported, so this runs in well under a second):

1. no import cycle among grpo_ray modules, counting module-level imports (the ones that run when
   the module is imported; imports inside functions run only when called, and are how a layer
   legitimately reaches a sibling lazily);
2. the maths (grpo_ray.core) imports only the standard library, torch, numpy and grpo_ray.core:
   no Ray, vLLM, DeepSpeed, config or other grpo_ray subpackage;
3. the verifiers import no actor module (grpo_ray.roles), no driver, no Ray;
4. layering: a module never imports a layer above its own, at any level (function-level too);
5. no file over 500 lines and no function over 60, but for the allow-lists below (temporary: they
   may only shrink).

Imports are resolved to absolute module names: relative ones against the importing module's
package, and `from pkg import name` to `pkg.name` where that is a module. A package's parents
(`grpo_ray`, `grpo_ray.verifiers` for grpo_ray.verifiers.code) are imported implicitly by Python
before the module itself; that is not counted as an edge, so `from . import sandbox` in
grpo_ray/verifiers/code.py is an edge to grpo_ray.verifiers.sandbox only.
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "grpo_ray"

# Layers, lowest first: a module may import its own layer or a lower-ranked one, never a higher
# or an equal-ranked other one. core <- models <- roles <- driver <- cli, with verifiers, data
# and config below roles: data validates rows against the verifiers (user `module:function`
# tasks), config checks reward components against them, models' warm start trains on data's
# arithmetic task.
LAYER_RANK = {
    "root": 0,  # grpo_ray/__init__.py: __version__ only
    "core": 0,
    "verifiers": 1,
    "envs": 1.5,  # environments: their tools run in the verifiers' sandbox; config and data check their names
    "data": 2,
    "config": 2,
    "models": 3,
    "roles": 4,
    "driver": 5,
    "cli": 6,
}

# (importing module, imported module) -> why this upward import is allowed. Keep it empty: an
# entry needs a reason a reviewer accepts, not "the test failed".
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# The maths may import these (besides the standard library and grpo_ray.core).
CORE_THIRD_PARTY = {"torch", "numpy"}
VERIFIERS_FORBIDDEN = ("grpo_ray.roles", "grpo_ray.driver", "ray")

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
# TEMPORARY allow-lists: path -> its line count when listed, which it may not grow past. Split the
# file or function and delete its entry; test_size_allow_lists_are_current fails on entries that
# are no longer needed so the lists only shrink.
FILE_ALLOW: dict[str, int] = {}
FUNCTION_ALLOW = {
    # the clipped loss reads best as one formula top to bottom; 19 of its lines are the docstring
    "grpo_ray/core/algorithm.py::policy_loss": 65,
    "grpo_ray/driver/plots.py::plot_run": 63,
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # absolute dotted name of what it imports
    line: int
    lazy: bool  # inside a function: runs when the function is called, not at import
    type_only: bool  # under `if TYPE_CHECKING:`: never runs

    def where(self) -> str:
        return f"{modules()[self.source].relative_to(REPO)}:{self.line}"


@functools.cache
def modules() -> dict[str, Path]:
    """Every module under grpo_ray/: dotted name -> file."""
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@functools.cache
def trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in modules().items()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        is_package = modules()[module].name == "__init__.py"
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules()]
    # `from pkg import sub` imports pkg implicitly (a parent); `from pkg import name` needs pkg run
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


@functools.cache
def imports() -> tuple[Import, ...]:
    out = []

    def walk(node: ast.AST, module: str, lazy: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend(Import(module, t, child.lineno, lazy, type_only) for t in _targets(child, module))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    walk(ast.Module(body=[stmt], type_ignores=[]), module, child_lazy, True)
                for stmt in child.orelse:
                    walk(ast.Module(body=[stmt], type_ignores=[]), module, child_lazy, type_only)
            else:
                walk(child, module, child_lazy, type_only)

    for name, tree in trees().items():
        walk(tree, name, False, False)
    return tuple(out)


def internal(target: str) -> str | None:
    """The grpo_ray module an import target names (`grpo_ray.core.records.Score` -> its module)."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules():
            return ".".join(parts)
        parts.pop()
    return None


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts == [PACKAGE]:
        return "root"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if parts[1] in LAYER_RANK else None


def _find_cycle(graph: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One import cycle as its edges, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root].items())))]
        path: list[Import] = []
        state[root] = 1
        while stack:
            node, edges = stack[-1]
            for target, edge in edges:
                if state.get(target) == 1:  # back edge: the cycle is path from target, plus edge
                    starts = [i for i, e in enumerate(path) if e.source == target]
                    return path[starts[0]:] + [edge] if starts else [edge]
                if not state.get(target):
                    state[target] = 1
                    path.append(edge)
                    stack.append((target, iter(sorted(graph.get(target, {}).items()))))
                    break
            else:
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
    return None


def _find_cycles(graph: dict[str, dict[str, Import]], limit: int = 10) -> list[list[Import]]:
    """Up to `limit` cycles: each found one's closing edge is dropped before looking again."""
    graph = {k: dict(v) for k, v in graph.items()}
    cycles = []
    while len(cycles) < limit and (cycle := _find_cycle(graph)):
        cycles.append(cycle)
        del graph[cycle[-1].source][internal(cycle[-1].target)]
    return cycles


def import_graph(*, module_level_only: bool) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules()}
    for imp in imports():
        target = internal(imp.target)
        if target is None or target == imp.source or imp.type_only:
            continue
        if module_level_only and imp.lazy:
            continue
        graph[imp.source].setdefault(target, imp)
    return graph


def test_parses_the_whole_package():
    assert f"{PACKAGE}.core.algorithm" in modules() and f"{PACKAGE}.verifiers" in modules()
    assert any(i.lazy for i in imports()) and any(not i.lazy for i in imports())


def test_no_module_level_import_cycle():
    cycles = _find_cycles(import_graph(module_level_only=True))
    assert not cycles, (
        "import cycles among grpo_ray modules (module-level imports):\n"
        + "\n".join("  cycle:\n" + "\n".join(f"    {e.source} -> {internal(e.target)}   ({e.where()})"
                                              for e in cycle) for cycle in cycles)
        + "\nBreak each: move what the modules share into a lower module (or grpo_ray.core), or make "
          "one import lazy (inside the function that needs it) where the layering test allows it.")


def test_core_imports_only_torch_numpy_and_stdlib():
    bad = []
    for imp in imports():
        if not imp.source.startswith(f"{PACKAGE}.core"):
            continue
        root = imp.target.split(".")[0]
        if imp.target == f"{PACKAGE}.core" or imp.target.startswith(f"{PACKAGE}.core."):
            continue
        if root == PACKAGE or (root not in sys.stdlib_module_names and root not in CORE_THIRD_PARTY):
            bad.append(f"{imp.where()}: {imp.source} imports {imp.target}")
    assert not bad, (
        "grpo_ray.core is the maths: it imports only the standard library, "
        f"{', '.join(sorted(CORE_THIRD_PARTY))} and grpo_ray.core (no Ray, vLLM, DeepSpeed, config or "
        "other grpo_ray subpackage):\n  " + "\n  ".join(bad)
        + "\nPass what it needs in as arguments (plain values, tensors), or move the code that needs "
          "the import up into models/ or roles/.")


def test_verifiers_import_no_actor_driver_or_ray():
    bad = [f"{imp.where()}: {imp.source} imports {imp.target}" for imp in imports()
           if imp.source.startswith(f"{PACKAGE}.verifiers")
           and any(imp.target == f or imp.target.startswith(f + ".") for f in VERIFIERS_FORBIDDEN)]
    assert not bad, (
        "verifiers must stay plain functions `verify(record, response) -> Score`, runnable outside "
        f"Ray; they import none of {', '.join(VERIFIERS_FORBIDDEN)}:\n  " + "\n  ".join(bad)
        + "\nPut the Ray side (replicas, scaling, actor options) in grpo_ray.roles.verifier_pool, "
          "which calls the verifiers.")


def test_every_module_has_a_layer():
    unknown = sorted(m for m in modules() if layer(m) is None)
    assert not unknown, (f"modules in no layer: {unknown}. Add the new subpackage to LAYER_RANK in "
                         "tests/test_architecture.py at the rank it belongs (and to docs/architecture.md).")


def test_layers_import_only_downwards():
    bad = []
    for imp in imports():
        target = internal(imp.target)
        src_layer, dst_layer = layer(imp.source), layer(target) if target else None
        if target is None or src_layer is None or dst_layer is None or src_layer == dst_layer:
            continue
        if LAYER_RANK[dst_layer] < LAYER_RANK[src_layer] or (imp.source, target) in ALLOWED_UPWARD:
            continue
        kind = "function-level" if imp.lazy else "module-level"
        bad.append(f"{imp.where()}: {imp.source} ({src_layer}, rank {LAYER_RANK[src_layer]}) imports "
                   f"{target} ({dst_layer}, rank {LAYER_RANK[dst_layer]}), {kind}")
    ranks = ", ".join(f"{k}={v}" for k, v in sorted(LAYER_RANK.items(), key=lambda kv: kv[1]))
    assert not bad, (
        f"a layer imports one above it or beside it (ranks: {ranks}):\n  " + "\n  ".join(bad)
        + "\nMove the code to the layer that owns it, or pass the higher layer's object/callable in "
          "as an argument. A real exception goes in ALLOWED_UPWARD with its reason.")


def _lines_outside_embedded_code(tree: ast.Module, text: str) -> int:
    """A file's lines, less module-level string constants assigned to a name that span lines:
    embedded programs such as the code verifier's harness are not this file's code."""
    embedded = sum(node.end_lineno - node.lineno + 1 for node in tree.body
                   if isinstance(node, (ast.Assign, ast.AnnAssign))
                   and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                   and node.end_lineno > node.lineno)
    return len(text.splitlines()) - embedded


def _functions(node: ast.AST, prefix: str = ""):
    """(qualified name, def node) for every function, nested and methods included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


@functools.cache
def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """(file -> lines, file::function -> lines from its `def` to its last line, docstring included)."""
    files, functions = {}, {}
    for name, path in modules().items():
        rel = path.relative_to(REPO).as_posix()
        files[rel] = _lines_outside_embedded_code(trees()[name], path.read_text())
        for qualname, fn in _functions(trees()[name]):
            functions[f"{rel}::{qualname}"] = fn.end_lineno - fn.lineno + 1
    return files, functions


def _too_long(counts: dict[str, int], limit: int, allow: dict[str, int]) -> list[str]:
    return [f"{name}: {n} lines (max {limit}" + (f"; allow-listed at {allow[name]})" if name in allow else ")")
            for name, n in sorted(counts.items()) if n > max(limit, allow.get(name, 0))]


def test_file_and_function_sizes():
    files, functions = sizes()
    bad = _too_long(files, MAX_FILE_LINES, FILE_ALLOW) + _too_long(functions, MAX_FUNCTION_LINES, FUNCTION_ALLOW)
    assert not bad, (
        "too long:\n  " + "\n  ".join(bad)
        + f"\nSplit it: a function into named steps of at most {MAX_FUNCTION_LINES} lines, a file into "
          f"modules of at most {MAX_FILE_LINES}. The allow-lists in tests/test_architecture.py are "
          "temporary and may only shrink: do not add to them or raise their counts.")


def test_size_allow_lists_are_current():
    files, functions = sizes()
    stale = [f"{f} (now {files.get(f, 'gone')})" for f in FILE_ALLOW
             if files.get(f, 0) <= MAX_FILE_LINES]
    stale += [f"{f} (now {functions.get(f, 'gone')})" for f in FUNCTION_ALLOW
              if functions.get(f, 0) <= MAX_FUNCTION_LINES]
    assert not stale, ("these allow-list entries are within the limits now (or gone): delete them "
                       "from FILE_ALLOW / FUNCTION_ALLOW in tests/test_architecture.py:\n  "
                       + "\n  ".join(stale))


def test_a_verifier_replica_imports_no_torch():
    """The verifier pool's replicas (roles/verifier_pool.py, what Serve imports in each) score text:
    importing torch cost each ~1 CPU-s at start-up, beside the roles that need it."""
    code = "import sys, grpo_ray.roles.verifier_pool; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
