"""Where each role runs: one Ray placement group reserves every generator, learner rank and the
reference at once, from the config's `resources` section.

Reserving all bundles together means a job either gets every device it needs or fails with a
message naming the role and the missing resource, instead of starting half its actors while the
rest wait for ever. Co-located roles share a bundle (OpenRLHF's colocate options): the bundle
holds the largest GPU count of its members, and each GPU-using member asks for an equal share of
it, so Ray gives them the same device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config


class PlacementError(RuntimeError):
    pass


@dataclass(frozen=True)
class Slot:
    """One role instance's place: its bundle in the placement group and what it asks for there."""
    role: str     # generator | learner | reference
    index: int    # generator index or learner rank
    bundle: int
    cpus: float
    gpus: float


def instance_resources(cfg: Config, role: str) -> tuple[float, float]:
    """(CPUs, GPUs) one instance of a role asks for: resources.<role>_cpus/_gpus, for a
    generator times rollout.tensor_parallel (its workers share one bundle, so one node)."""
    res, shards = cfg.resources, cfg.rollout.tensor_parallel if role == "generator" else 1
    return getattr(res, f"{role}_cpus") * shards, getattr(res, f"{role}_gpus") * shards


def plan(cfg: Config) -> tuple[list[dict[str, float]], list[Slot]]:
    """The placement group's bundles and every role instance's slot (pure: no Ray).
    Bundles 0..M-1 are the learner ranks, so rank r's bundle index is r."""
    res = cfg.resources
    groups: list[list[tuple[str, int, float, float]]] = [
        [("learner", r, *instance_resources(cfg, "learner"))] for r in range(cfg.learner.num_ranks)]
    gens = [("generator", i, *instance_resources(cfg, "generator")) for i in range(cfg.rollout.num_generators)]
    ref = [("reference", 0, *instance_resources(cfg, "reference"))] if cfg.reference_actor else []
    if res.colocate == "none":
        groups += [[m] for m in gens + ref]
    else:
        groups[0] += ref
        if res.colocate == "all":  # generator i with learner rank i mod M
            for i, g in enumerate(gens):
                groups[i % len(groups)].append(g)
        else:
            groups += [[g] for g in gens]
    bundles, slots = [], []
    for b, members in enumerate(groups):
        gpus = max(m[3] for m in members)
        users = sum(m[3] > 0 for m in members)
        bundle = {"CPU": round(sum(m[2] for m in members), 4)}
        if gpus:
            bundle["GPU"] = gpus
        bundles.append(bundle)
        # rounded down: shares that add up to more than the bundle would leave one actor unplaced
        share = math.floor(gpus / users * 1e4) / 1e4 if users else 0.0
        slots += [Slot(role, i, b, cpus, share if g else 0.0) for role, i, cpus, g in members]
    return bundles, slots


def check_tensor_parallel_fits(cfg: Config, nodes: list[dict]) -> None:
    """A sharded generator's workers all run on one node: that many GPUs (or, on CPUs, that many
    cores: vLLM binds each worker's threads to its own) must be on a single node of the cluster."""
    tp, gpus = cfg.rollout.tensor_parallel, cfg.resources.generator_gpus
    if tp <= 1 or not nodes:
        return
    kind, need = ("GPU", tp * gpus) if gpus else ("CPU", tp)
    most = max(node.get(kind, 0.0) for node in nodes)
    if need > most + 1e-9:
        raise PlacementError(f"could not place the roles: rollout.tensor_parallel={tp} needs {need:g} {kind}s on one "
                             "node for each generator (a tensor-parallel group never spans nodes), and the largest "
                             f"node has {most:g}; lower rollout.tensor_parallel or add larger nodes")


def _config_key(role: str, resource: str) -> str:
    return f"resources.{role}_{resource.lower()}s"


def diagnose(bundles: list[dict], slots: list[Slot], total: dict, nodes: list[dict], available: dict,
             strategy: str) -> str:
    """Why the bundles do not fit: a role asking for more of a resource than the cluster has,
    a bundle larger than any node, or a strategy the node count cannot meet; else what is free."""
    demand: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            demand[key] = demand.get(key, 0.0) + amount
    for key, need in demand.items():
        if need > total.get(key, 0.0) + 1e-9:
            roles = sorted({s.role for s in slots if (s.gpus if key == "GPU" else s.cpus) > 0})
            asks = ", ".join(f"{r} {sum(s.gpus if key == 'GPU' else s.cpus for s in slots if s.role == r):g} "
                             f"({_config_key(r, key)})" for r in roles)
            return (f"the roles need {key} {need:g} in all ({asks}) but the cluster has {key} "
                    f"{total.get(key, 0.0):g}; lower those resources or add nodes with {key}")
    for b, bundle in enumerate(bundles):
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
            who = " + ".join(f"{s.role} {s.index}" for s in slots if s.bundle == b)
            sharded = " (rollout.tensor_parallel workers of a generator share its bundle)" if "generator" in who else ""
            return (f"the bundle of {who} ({bundle}) fits on no node{sharded}; lower resources.*_cpus/_gpus, "
                    "co-locate fewer roles (resources.colocate), or add larger nodes")
    if strategy == "STRICT_PACK" and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in demand.items())
                                             for n in nodes):
        return f"resources.placement_strategy=STRICT_PACK needs {demand} on one node; use PACK"
    if strategy == "STRICT_SPREAD" and len(nodes) < len(bundles):
        return (f"resources.placement_strategy=STRICT_SPREAD needs {len(bundles)} nodes, the cluster has "
                f"{len(nodes)}; use SPREAD")
    return (f"the cluster has the resources ({total}) but not free now (free: {available}): other jobs or "
            f"actors hold them, or the autoscaler is still adding nodes; raise resources.placement_timeout_s")


@dataclass
class Placement:
    group: object  # ray.util.placement_group.PlacementGroup
    slots: list[Slot]
    _nodes: dict[int, str] | None = None

    def slot(self, role: str, index: int = 0) -> Slot:
        return next(s for s in self.slots if s.role == role and s.index == index)

    def options(self, role: str, index: int = 0) -> dict:
        """Actor options that put this role instance in its bundle with its share of it."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        s = self.slot(role, index)
        return dict(num_cpus=s.cpus, num_gpus=s.gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=s.bundle))

    def nodes(self) -> dict[int, str]:
        """Bundle index -> the Ray node id it was placed on (the group is ready)."""
        from ray.util import placement_group_table

        if self._nodes is None:
            self._nodes = dict(placement_group_table(self.group)["bundles_to_node_id"])
        return self._nodes

    def remove(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.group)


def reserve(cfg: Config) -> Placement:
    """Create the placement group and wait for it; PlacementError says what could not be placed."""
    import ray
    from ray.util import placement_group, remove_placement_group

    res = cfg.resources
    check_tensor_parallel_fits(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    bundles, slots = plan(cfg)
    group = placement_group(bundles, strategy=res.placement_strategy)
    try:
        placed = group.wait(timeout_seconds=res.placement_timeout_s)
    except BaseException:  # a stop (SIGTERM) while it waits: no group left behind on the cluster
        remove_placement_group(group)
        raise
    if placed:
        return Placement(group, slots)
    remove_placement_group(group)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    why = diagnose(bundles, slots, ray.cluster_resources(), nodes, ray.available_resources(),
                   res.placement_strategy)
    raise PlacementError(f"could not place the roles within {res.placement_timeout_s:g}s "
                         f"(resources.placement_timeout_s): {why}")
