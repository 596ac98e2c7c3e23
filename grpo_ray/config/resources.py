"""CPU shares of the roles on a node: which cores each vLLM engine and each torch role gets
(resources.vllm_cpu_threads, resources.torch_threads; auto resolved here)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sections import Config


def cpu_threads(cfg: Config, node_cpus: int, peer: int = 0, peers: int = 1) -> tuple[str, int]:
    """(vLLM's CPU ids, torch threads) for one role instance on a node of node_cpus CPUs, where
    it is instance `peer` of the `peers` instances of its role on that node; auto resolved.

    Sync mode runs the phases one after another, so the generators together get every CPU, and
    so do the learner ranks together, and the reference. Asynchronous mode overlaps generating
    step n+1 with learning on step n, which only pays if the two do not compete for the same
    cores: the generators take the first half, the learner ranks and the reference the rest.
    On this project's 2-core box, the tiny benchmark took 0.9 s a step async with shared cores
    and 0.22 s split (sync: 0.33 s). A generator on a GPU needs no CPU share.

    Several generators on a node each get a disjoint slice of the generator cores (generator
    `peer` the peer-th slice; more generators than cores wrap around). vLLM's scheduler and
    output handling are single-threaded Python (~60% of a tiny model's generate call), so two
    engines on one core each sample faster than one engine on two: tiny sync step, generate
    0.15 -> 0.12 s. Learner ranks on a node split the torch threads the same way. The engine runs
    in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), where this vLLM binds no OpenMP threads to
    the ids (only its multiprocess executor reads VLLM_CPU_OMP_THREADS_BIND): a slice's size sets
    the actor's thread count (OMP_NUM_THREADS), and the OS places the threads."""
    res, n = cfg.resources, max(1, node_cpus)
    split = cfg.rollout.asynchronous and res.generator_gpus == 0 and n > 1
    gen = n // 2 if split else n
    peers = max(1, peers)
    if res.vllm_cpu_threads != "auto":
        vllm = res.vllm_cpu_threads
    elif peers <= gen:
        vllm = f"{peer * gen // peers}-{(peer + 1) * gen // peers - 1}"
    else:
        vllm = f"{peer % gen}-{peer % gen}"
    return vllm, res.torch_threads or max(1, (n - gen if split else n) // peers)


def cpu_list(spec: str) -> list[int]:
    """CPU ids of a list like "0-1,4" (vLLM's VLLM_CPU_OMP_THREADS_BIND syntax)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def shard_cpus(spec: str, shards: int) -> str:
    """A tensor-parallel engine's VLLM_CPU_OMP_THREADS_BIND: its CPU ids split into `shards`
    slices, one per worker ("0-3", 2 -> "0-1|2-3"); fewer ids than shards share them in turn."""
    ids = cpu_list(spec)
    if len(ids) < shards:
        return "|".join(str(ids[i % len(ids)]) for i in range(shards))
    parts = [ids[i * len(ids) // shards:(i + 1) * len(ids) // shards] for i in range(shards)]
    return "|".join(",".join(map(str, p)) for p in parts)
