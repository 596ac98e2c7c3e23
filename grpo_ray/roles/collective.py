"""sync.method=collective: the learner's rank 0 and every generator worker (each tensor-parallel
shard of each generator) join one process group per run, apart from the learners' own group and
vLLM's, and rank 0 broadcasts the buckets it packs from its memory into every worker's (NCCL on
GPUs, gloo on CPUs). The object store's path puts them in rank 0's store, copies them to each
generator node and maps them there; OpenRLHF, ROLL and prime-rl broadcast with NCCL instead.

The group is stateless (a TCPStore and a ProcessGroup object, not torch.distributed's default
group), so it can be made again with other members: after a generator restarts, the fleet
forms a new one (a new `generation`) rather than repairing the old. Every collective has the
group's timeout, so a member that never arrives fails the call instead of hanging it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from .weight_sync import BucketLayout, WeightBucket


@dataclass(frozen=True)
class GroupAddress:
    """Where and how the members meet: rank 0 (the learner) hosts the store at host:port."""
    host: str
    port: int
    world: int       # 1 + every generator's tensor_parallel workers
    backend: str     # nccl | gloo
    timeout_s: float
    generation: int  # how many groups this run has formed: a new one after a restart


class SyncGroup:
    """One member's handle: broadcast from rank 0, into every other rank."""

    def __init__(self, address: GroupAddress, rank: int):
        import torch.distributed as dist

        timeout = timedelta(seconds=address.timeout_s)
        store = dist.TCPStore(address.host, address.port, address.world, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
        store = dist.PrefixStore(f"grpo-sync-{address.generation}", store)
        self.address, self.rank, self._store = address, rank, store  # the store lives as long as the group
        if address.backend == "nccl":
            # NCCL's wait() only orders the CUDA stream, and its watchdog kills the process on a
            # timeout: a blocking wait makes a missing member raise here instead
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, address.world, options)
        else:
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(store, rank, address.world, timeout)
        self.broadcast(torch.zeros(1, device=self.device))  # every member is in before join returns

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into every member's (in place); raises after the group's timeout."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = timedelta(seconds=self.address.timeout_s)
        try:
            self.group.broadcast([tensor], opts).wait()
            if tensor.is_cuda:
                torch.cuda.current_stream(tensor.device).synchronize()
        except Exception:
            with contextlib.suppress(Exception):  # free the communicator; the fleet forms a new group
                self.group.abort()
            raise
        return tensor

    def send(self, buckets: list[WeightBucket]) -> int:
        """Rank 0: broadcast each bucket; returns the bytes sent."""
        for bucket in buckets:
            self.broadcast(torch.from_numpy(bucket.data).to(self.device))
        return sum(int(b.data.nbytes) for b in buckets)

    def receive(self, layouts: list[BucketLayout]) -> list[WeightBucket]:
        """Any other rank: the buckets rank 0 sends, in the layouts' order (the data stays on the
        group's device: a GPU worker loads straight from it)."""
        return [WeightBucket(self.broadcast(torch.empty(lay.nbytes, dtype=torch.uint8, device=self.device)),
                             lay.entries) for lay in layouts]


# Below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999): a port the
# kernel hands out to bind(0) may be given to another process's connection before rank 0 binds it
# seconds later (EADDRINUSE at the learners' init, seen in CI while Ray workers were starting).
PORT_RANGE = (20000, 32767)


def free_address() -> tuple[str, int]:
    """This node's IP and a free port, for a group whose rank 0 runs here."""
    import random

    import ray

    rng = random.Random()  # not the run's seeded streams
    for _ in range(64):
        port = rng.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return ray.util.get_node_ip_address(), port
    with socket.socket() as s:  # a crowded range: any port
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def join_worker(worker, address: GroupAddress, first_rank: int) -> int:
    """Runs in each vLLM worker (collective_rpc): join as first_rank + the worker's TP rank; a
    group of an earlier generation is dropped. Returns the rank taken."""
    rank = first_rank + int(getattr(worker, "rank", 0) or 0)
    worker._grpo_sync = None  # the old group's sockets close before the new one opens
    worker._grpo_sync = SyncGroup(address, rank)
    return rank


def receive_buckets(worker, layouts: list[BucketLayout]) -> list[WeightBucket]:
    """Runs in each vLLM worker: the buckets of this sync, from rank 0's broadcast."""
    group = getattr(worker, "_grpo_sync", None)
    if group is None:
        raise RuntimeError("this generator is in no weight-sync group (sync.method=collective): it was "
                           "restarted since the group formed; the fleet forms a new one before the next push")
    return group.receive(layouts)
