"""Issue 5: the roles' placement group. Bundles and shares from the config (pure), the message
when the cluster cannot hold the roles (real Ray, quick), and co-location on a Ray cluster that
advertises GPUs (slow: real vLLM and DeepSpeed actors; this machine has no GPU, so Ray's GPU
resource is declared and only the assignment of device ids is checked)."""
import time

import pytest

from grpo_ray.config import load_config
from grpo_ray.roles.placement import PlacementError, diagnose, plan


def _cfg(*overrides):
    """default.yaml with one generator and one learner rank, unless the test says otherwise."""
    return load_config("configs/default.yaml", ["rollout.num_generators=1", "learner.num_ranks=1", *overrides])


def test_plan_gives_each_instance_a_bundle_by_default():
    bundles, slots = plan(_cfg("rollout.num_generators=2", "learner.num_ranks=2", "resources.learner_gpus=1",
                               "resources.generator_gpus=0.5"))
    assert bundles == [{"CPU": 0.25, "GPU": 1.0}, {"CPU": 0.25, "GPU": 1.0}, {"CPU": 0.25, "GPU": 0.5},
                       {"CPU": 0.25, "GPU": 0.5}, {"CPU": 0.25}]
    assert [(s.role, s.index, s.bundle, s.gpus) for s in slots] == [
        ("learner", 0, 0, 1.0), ("learner", 1, 1, 1.0), ("generator", 0, 2, 0.5), ("generator", 1, 3, 0.5),
        ("reference", 0, 4, 0.0)]


def test_plan_colocated_roles_share_a_bundle_and_its_gpu():
    bundles, slots = plan(_cfg("rollout.num_generators=2", "learner.num_ranks=2", "resources.colocate=all",
                               "resources.learner_gpus=1", "resources.generator_gpus=1", "resources.reference_gpus=1"))
    # rank 0 + reference + generator 0 | rank 1 + generator 1; each member gets an equal GPU share
    assert bundles == [{"CPU": 0.75, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]
    share = {(s.role, s.index): (s.bundle, s.gpus) for s in slots}
    assert share == {("learner", 0): (0, 0.3333), ("reference", 0): (0, 0.3333), ("generator", 0): (0, 0.3333),
                     ("learner", 1): (1, 0.5), ("generator", 1): (1, 0.5)}
    bundles, slots = plan(_cfg("resources.colocate=learner_reference", "resources.learner_gpus=1"))
    assert bundles == [{"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.25}]  # the CPU-only reference takes no GPU share
    assert {(s.role, s.bundle, s.gpus) for s in slots} == {("learner", 0, 1.0), ("reference", 0, 0.0),
                                                           ("generator", 1, 0.0)}


def test_plan_without_a_reference_has_no_reference_bundle():
    """algo.beta=0 with algo.kl_stop=null: nothing needs the reference, so nothing is reserved
    for it (on a GPU cluster, resources.reference_gpus would hold a device idle)."""
    bundles, slots = plan(_cfg("algo.beta=0", "algo.kl_stop=null", "resources.reference_gpus=1"))
    assert bundles == [{"CPU": 0.25}, {"CPU": 0.25}] and "reference" not in {s.role for s in slots}
    bundles, slots = plan(_cfg("algo.beta=0", "algo.kl_stop=null", "resources.colocate=learner_reference"))
    assert bundles == [{"CPU": 0.25}, {"CPU": 0.25}] and "reference" not in {s.role for s in slots}
    # beta 0 with the KL guard on still measures the KL, against a reference
    assert "reference" in {s.role for s in plan(_cfg("algo.beta=0", "resources.reference_host=actor"))[1]}


@pytest.mark.parametrize("host,gpus,own", [("auto", 0, False), ("auto", 1, True), ("actor", 0, True),
                                           ("learner", 1, False)])
def test_a_reference_in_the_learner_ranks_has_no_bundle(host, gpus, own):
    """resources.reference_host: an actor has a bundle; in the learner ranks, nothing is reserved
    for it. auto: in the learner ranks on CPUs only (no device to keep apart)."""
    cfg = _cfg(f"resources.reference_host={host}", f"resources.learner_gpus={gpus}")
    assert cfg.uses_reference and cfg.reference_actor == own
    assert ("reference" in {s.role for s in plan(cfg)[1]}) == own


def test_diagnose_names_the_role_and_the_missing_resource():
    cfg = _cfg("learner.num_ranks=2", "resources.learner_gpus=1", "resources.generator_gpus=1")
    bundles, slots = plan(cfg)
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    why = diagnose(bundles, slots, one_gpu, [one_gpu], one_gpu, "PACK")
    assert "GPU 3" in why and "learner 2 (resources.learner_gpus)" in why and "generator 1" in why
    assert "the cluster has GPU 1" in why
    # enough CPUs in all, but the co-located bundle (8.25 CPUs) fits on no 4-CPU node
    cfg = _cfg("resources.colocate=all", "resources.learner_cpus=4", "resources.generator_cpus=4",
               "resources.reference_host=actor")
    bundles, slots = plan(cfg)
    small = [{"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 4.0}]
    why = diagnose(bundles, slots, {"CPU": 12.0}, small, {"CPU": 12.0}, "PACK")
    assert "learner 0 + reference 0 + generator 0" in why and "fits on no node" in why
    bundles, slots = plan(_cfg("resources.reference_host=actor"))
    why = diagnose(bundles, slots, {"CPU": 2.0}, [{"CPU": 2.0}], {"CPU": 0.1}, "STRICT_SPREAD")
    assert "STRICT_SPREAD needs 3 nodes" in why
    why = diagnose(bundles, slots, {"CPU": 2.0}, [{"CPU": 2.0}], {"CPU": 0.1}, "PACK")
    assert "not free now" in why and "placement_timeout_s" in why


def test_unplaceable_roles_fail_fast_with_a_clear_message(ray_local, tiny_model_dir):
    """No GPU on this cluster: asking learners for one fails after placement_timeout_s, naming
    the role and the resource, and leaves no placement group behind."""
    from ray.util import placement_group_table

    from grpo_ray.roles.actors import start_roles

    cfg = _cfg("resources.learner_gpus=1", "resources.placement_timeout_s=2", f"model.path={tiny_model_dir}")
    t0 = time.perf_counter()
    with pytest.raises(PlacementError) as err:
        start_roles(cfg, tiny_model_dir)
    assert time.perf_counter() - t0 < 15
    msg = str(err.value)
    assert "within 2s (resources.placement_timeout_s)" in msg and "learner 1 (resources.learner_gpus)" in msg
    assert "cluster has GPU 0" in msg
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_auto_threads_follow_where_the_bundles_landed(ray_local):
    """resources.*threads=auto, resolved per instance from the placement group: the two
    generators on this node take disjoint cores, the two learner ranks split the torch threads,
    and the reference (one instance) gets every core."""
    import os

    from grpo_ray.roles.actors import role_threads
    from grpo_ray.config import cpu_list
    from grpo_ray.roles.placement import reserve

    cfg = _cfg("rollout.num_generators=2", "learner.num_ranks=2", "resources.reference_host=actor")
    placement, cpus = reserve(cfg), len(os.sched_getaffinity(0))
    try:
        gens = [cpu_list(role_threads(cfg, placement, "generator", i)[0]) for i in range(2)]
        assert set(gens[0]) | set(gens[1]) == set(range(cpus))
        assert not set(gens[0]) & set(gens[1]) or cpus == 1
        assert [role_threads(cfg, placement, "learner", r)[1] for r in range(2)] == [max(1, cpus // 2)] * 2
        assert role_threads(cfg, placement, "reference")[1] == cpus
    finally:
        placement.remove()


def test_gpu_shares_never_add_up_to_more_than_the_bundle():
    """Six members on one GPU: 1/6 rounded to 0.1667 six times would ask for 1.0002 GPUs, and
    the last actor would wait for ever; shares are rounded down."""
    bundles, slots = plan(_cfg("rollout.num_generators=5", "resources.colocate=all", "resources.learner_gpus=1",
                               "resources.generator_gpus=1"))
    assert bundles[0]["GPU"] == 1.0 and len([s for s in slots if s.bundle == 0]) == 7
    assert sum(s.gpus for s in slots if s.bundle == 0) <= 1.0
