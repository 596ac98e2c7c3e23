"""Issue 5: roles asking for GPUs on a Ray cluster that advertises two (slow). This machine has
no GPU: Ray's GPU resource is declared, so what is checked is what Ray decides (bundles, device
ids, co-location); the actors still compute on the CPU, and a full step runs that way."""
import json
import os

import pytest

from grpo_ray.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_gpus():
    from conftest import init_local_ray

    ray = init_local_ray(num_gpus=2)
    yield ray
    ray.shutdown()


def _where(ray, actor) -> tuple[list, str]:
    """(GPU ids Ray gave the actor, its placement group id)."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: (ray.get_gpu_ids(), ray.get_runtime_context().get_placement_group_id())))


def test_separate_roles_get_their_own_gpus(ray_gpus, tiny_model_dir):
    from grpo_ray.roles.actors import start_roles, stop_roles

    ray = ray_gpus
    cfg = load_config("configs/default.yaml", ["resources.learner_gpus=1", "resources.generator_gpus=1",
                                               "rollout.num_generators=1", "learner.num_ranks=1",
                                               f"model.path={tiny_model_dir}"])
    roles = start_roles(cfg, tiny_model_dir)
    try:
        (gen_gpus, gen_pg), (lrn_gpus, lrn_pg), (ref_gpus, ref_pg) = (
            _where(ray, a) for a in (roles.fleet.actors[0], roles.learners.actors[0], roles.reference.actor))
        assert len(gen_gpus) == len(lrn_gpus) == 1 and gen_gpus != lrn_gpus and ref_gpus == []
        assert gen_pg == lrn_pg == ref_pg == roles.placement.group.id.hex()
    finally:
        stop_roles(roles)


def test_colocated_roles_share_one_gpu_and_train(ray_gpus, tiny_model_dir, tmp_path, monkeypatch):
    """colocate=all on 1 of the 2 GPUs: one step of the real loop with learner, reference and
    generator sharing a device (a third each)."""
    import grpo_ray.driver.train as train_mod
    from grpo_ray.driver.train import train
    from test_train_loop import _dataset

    ray = ray_gpus
    cfg = load_config("configs/default.yaml", [
        "resources.colocate=all", "resources.learner_gpus=1", "resources.generator_gpus=1",
        "resources.reference_gpus=1", "rollout.num_generators=1", "learner.num_ranks=1", "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=1",
        "train.eval_every=0", "eval.num_prompts=4", "eval.samples=10", f"run.output_dir={tmp_path}",
        f"model.path={tiny_model_dir}", "data.task=jsonl", f"data.train_path={_dataset(tmp_path / 't.jsonl')}",
        "data.eval_fraction=0.5"])
    seen = []
    original = train_mod.start_roles

    def start_and_look(*args, **kwargs):  # the real start_roles, then where Ray put each actor
        roles = original(*args, **kwargs)
        seen.extend(_where(ray, a) for a in roles.fleet.actors + roles.learners.actors + [roles.reference.actor])
        return roles

    monkeypatch.setattr(train_mod, "start_roles", start_and_look)
    run_dir = train(cfg)
    assert len(seen) == 3 and all(gpus == seen[0][0] and len(gpus) == 1 for gpus, _ in seen)
    assert len({pg for _, pg in seen}) == 1
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert len(rows) == 1 and rows[0]["grad_norm"] > 0
