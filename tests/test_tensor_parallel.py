"""Tensor-parallel generators (rollout.tensor_parallel) and the collective weight sync
(sync.method=collective): vLLM's CPU build shards the tiny model over two worker processes,
and the learner's rank 0 broadcasts its weights to every worker over gloo."""
import json
import os

import psutil
import pytest
import torch

from grpo_ray.config import ConfigError, load_config, shard_cpus
from grpo_ray.core.algorithm import loss_normalizer
from grpo_ray.core.records import TrainBatch
from grpo_ray.roles.fleet import Sampling

PROMPTS = ["Q: 1+2=?\nA:", "Q: 13+29=?\nA:", "Q: 7+8=?\nA:"]


# ------------------------------------------------------------------ config, before any actor
def test_bad_tensor_parallel_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel=3 does not divide model\.num_heads=4"):
        load_config("configs/default.yaml", ["rollout.tensor_parallel=3"])
    with pytest.raises(ConfigError, match=r"resources\.generator_gpus=0\.5 with rollout\.tensor_parallel=2"):
        load_config("configs/default.yaml", ["rollout.tensor_parallel=2", "resources.generator_gpus=0.5"])
    with pytest.raises(ConfigError, match=r"resources\.colocate=all with rollout\.tensor_parallel=2"):
        load_config("configs/default.yaml", ["rollout.tensor_parallel=2", "resources.generator_gpus=1",
                                             "resources.learner_gpus=1", "resources.colocate=all"])
    with pytest.raises(ConfigError, match=r"sync\.method=collective .* model\.lora\.sync=adapter"):
        load_config("configs/default.yaml", ["sync.method=collective", "model.lora.rank=4",
                                             "model.lora.sync=adapter"])
    with pytest.raises(ConfigError, match=r"sync\.method"):
        load_config("configs/default.yaml", ["sync.method=nccl"])
    assert load_config("configs/default.yaml", ["rollout.tensor_parallel=2"]).rollout.tensor_parallel == 2


def test_a_model_folder_whose_heads_the_tp_size_does_not_divide_is_refused(tiny_model_dir):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir, check_tensor_parallel

    check_tensor_parallel(tiny_model_dir, 2)  # 4 heads, 2 KV heads
    check_tensor_parallel(tiny_model_dir, 4)  # each KV head replicated on 2 workers
    with pytest.raises(ModelDirError, match=r"rollout\.tensor_parallel=3 .*4 heads, 2 KV heads.*\[1, 2, 4\]"):
        check_tensor_parallel(tiny_model_dir, 3)
    with pytest.raises(ModelDirError, match=r"rollout\.tensor_parallel=3"):  # train, grpo-ray eval, compare
        check_model_dir(tiny_model_dir, tensor_parallel=3)


def test_a_tp_generator_is_one_bundle_and_a_too_small_node_is_named():
    from grpo_ray.roles.placement import PlacementError, check_tensor_parallel_fits, plan

    cfg = load_config("configs/default.yaml", ["rollout.tensor_parallel=2", "rollout.num_generators=2",
                                               "resources.generator_cpus=1", "algo.beta=0", "algo.kl_stop=null"])
    bundles, slots = plan(cfg)
    gens = [bundles[s.bundle] for s in slots if s.role == "generator"]
    assert gens == [{"CPU": 2.0}, {"CPU": 2.0}]  # a TP group never spans nodes: one bundle each
    check_tensor_parallel_fits(cfg, [{"CPU": 2.0}])
    with pytest.raises(PlacementError, match=r"rollout\.tensor_parallel=4 needs 4 CPUs on one node.*largest node has 2"):
        check_tensor_parallel_fits(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
            update={"tensor_parallel": 4})}), [{"CPU": 2.0}, {"CPU": 2.0}])
    gpu = load_config("configs/default.yaml", ["rollout.tensor_parallel=4", "resources.generator_gpus=1"])
    with pytest.raises(PlacementError, match=r"needs 4 GPUs on one node.*largest node has 2"):
        check_tensor_parallel_fits(gpu, [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}])


def test_each_worker_of_a_sharded_engine_gets_its_own_cores():
    assert shard_cpus("0-3", 2) == "0,1|2,3"
    assert shard_cpus("0-1", 2) == "0|1"
    assert shard_cpus("1", 2) == "1|1"  # fewer cores than workers: they share it


def test_rendezvous_ports_come_from_outside_the_ephemeral_and_ray_worker_ranges(ray_local, monkeypatch):
    """A port bind(0) picked could be handed to another process's connection before rank 0 bound
    it (EADDRINUSE at the learners' init in a CI run); free_address draws from 20000-32767, and a
    taken port is skipped."""
    import random
    import socket

    from grpo_ray.roles import collective

    ports = {collective.free_address()[1] for _ in range(20)}
    assert all(20000 <= p <= 32767 for p in ports) and len(ports) > 10
    with socket.socket() as taken:
        taken.bind(("", min(ports)))
        draws = iter([min(ports), min(ports) + 1])

        class Draws:
            def randint(self, low, high):
                return next(draws)

        monkeypatch.setattr(random, "Random", Draws)
        assert collective.free_address()[1] == min(ports) + 1  # the one in use is skipped


# ------------------------------------------------------------------ real engines (slow)
def _batch(ro) -> TrainBatch:
    return TrainBatch.from_rollout(ro, torch.randn(len(ro), generator=torch.Generator().manual_seed(0)), pad_id=0)


@pytest.mark.slow
def test_a_tp2_generator_samples_as_one_worker_and_takes_broadcast_weights(ray_local, tiny_model_dir):
    """Same tokens and logprobs (1e-4) as TP=1 on the same weights and seeds; then the learner's
    rank 0 broadcasts an update to both workers of the TP=2 engine and to the TP=1 engine in
    one gloo group, every worker loads the whole set, and the next samples' logprobs are the
    learner's (1e-4): each shard holds its part of the new weights. The TP=1 engine takes
    vLLM's generic reload (the GPU path), which receives the buckets one at a time."""
    from grpo_ray.roles.collective import GroupAddress
    from grpo_ray.roles.generator import Generator
    from grpo_ray.roles.learner import Learner

    ray = ray_local
    gen = ray.remote(Generator)
    # a one-id binding in the inherited environment (an in-process engine in the process that
    # started Ray sets it) must not reach the TP=2 engine's workers
    tp2 = gen.options(num_cpus=0.5, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0"}}).remote(
        tiny_model_dir, cpu_threads="0-1", seed=0, tensor_parallel=2)
    tp1 = gen.options(num_cpus=0.25).remote(tiny_model_dir, cpu_threads="0", seed=0)
    learner = ray.remote(Learner).options(num_cpus=0.25).remote(
        tiny_model_dir, lr=1e-2, loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean"),
        micro_batch_size=16, master_port=29641)
    try:
        a, b = ray.get([g.generate.remote(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=3) for g in (tp1, tp2)])
        assert a.response_ids == b.response_ids
        assert max(abs(x - y) for la, lb in zip(a.old_logprobs, b.old_logprobs) for x, y in zip(la, lb)) < 1e-4

        host, port = ray.get(learner.sync_address.remote())
        address = GroupAddress(host, port, world=4, backend="gloo", timeout_s=60, generation=1)
        ranks = ray.get([learner.join_sync_group.remote(address), tp2.join_sync_group.remote(address, 1),
                         tp1.join_sync_group.remote(address, 3)])
        assert ranks == [0, [1, 2], [3]]
        # the TP=1 engine takes vLLM's generic reload, as on GPUs: it receives bucket by bucket
        ray.get(tp1.__ray_call__.remote(lambda self: self.llm.collective_rpc(_generic_reload)))
        batch = _batch(a)
        stats, layouts = learner.update_then_pack.options(num_returns=2).remote(
            [batch], [loss_normalizer(batch.response_mask, "seq_mean")], 1, "float32", True)
        assert ray.get(stats)["grad_norm"] > 0
        loads = [g.update_weights.remote(layouts, 1) for g in (tp2, tp1)]
        sent = ray.get(learner.broadcast_weights.remote())
        assert sent == sum(lay.nbytes for lay in ray.get(layouts)) > 0
        assert ray.get(loads)[0] == ray.get(loads)[1] > 0  # every tensor, on each worker of each engine
        for g in (tp2, tp1):
            ro = ray.get(g.generate.remote(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=11))
            assert ro.weight_version == 1
            b2 = TrainBatch.from_rollout(ro, torch.zeros(len(ro)), pad_id=0)
            gap = (ray.get(learner.logprobs.remote(b2)) - b2.old_logprobs).abs() * b2.response_mask
            assert float(gap.max()) < 1e-4
        before = ray.get(learner.logprobs.remote(_batch(a)))
        assert float(((before - _batch(a).old_logprobs).abs() * _batch(a).response_mask).max()) > 1e-3  # it moved
    finally:
        for actor in (tp2, tp1, learner):
            ray.kill(actor)


@pytest.mark.slow
def test_a_broadcast_a_generator_never_takes_fails_the_sync_naming_it(ray_local, tiny_model_dir):
    """A frozen generator (SIGSTOP) never enters the broadcast: the learner's side fails after
    sync.timeout_s, and the error names that generator, not the one that took its weights."""
    import signal

    from grpo_ray.roles.fleet import CollectiveSync, GeneratorFleet
    from grpo_ray.roles.generator import Generator
    from grpo_ray.roles.learner import Learner
    from grpo_ray.roles.learner_group import LearnerGroup

    ray = ray_local
    gens = [ray.remote(Generator).options(num_cpus=0.25).remote(tiny_model_dir, cpu_threads=str(i), seed=0)
            for i in range(2)]
    learner = ray.remote(Learner).options(num_cpus=0.25).remote(
        tiny_model_dir, lr=1e-2, loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean"),
        micro_batch_size=16, master_port=29643)
    group = LearnerGroup([learner], gather_on_all_ranks=False, collective=True)
    fleet = GeneratorFleet(gens, group, collective=CollectiveSync(1, "gloo", timeout_s=5.0))
    pid = ray.get(gens[1].__ray_call__.remote(lambda self: os.getpid()))
    try:
        fleet.ready()
        assert fleet.form_group()
        batch = _batch(fleet.sample(PROMPTS, Sampling(n=4, temperature=1.0, max_new_tokens=8), seed=1))
        os.kill(pid, signal.SIGSTOP)
        update = group.update(batch, mini_batches=1, aggregation="seq_mean", max_tokens=8, epochs=1)
        fleet.push(update.weights, version=1, broadcast=update.broadcast)
        with pytest.raises(RuntimeError, match=r"weight sync of version 1 \(sync.method=collective\) did not reach "
                                               r"generator 1 \(node [^)]*\) within sync.timeout_s=5"):
            fleet.settle()
        assert fleet._group is None  # the next resync forms a new one
    finally:
        os.kill(pid, signal.SIGCONT)
        for actor in gens + [learner]:
            ray.kill(actor)


@pytest.mark.slow
def test_a_generator_restarted_during_a_broadcast_gets_the_weights_and_a_new_group(ray_local, tiny_model_dir):
    """A generator killed right before a broadcast comes back in no group (Ray restarts it and
    runs its load again, which finds no group and loads nothing); the broadcast fails on the
    learner's side, and the fleet pushes the current weights through the object store and forms
    a new group, through which the next update goes: no error, every generator current."""
    import signal

    from grpo_ray.roles.fleet import CollectiveSync, GeneratorFleet
    from grpo_ray.roles.generator import Generator
    from grpo_ray.roles.learner import Learner
    from grpo_ray.roles.learner_group import LearnerGroup

    ray = ray_local
    gens = [ray.remote(Generator).options(num_cpus=0.25, max_restarts=1, max_task_retries=1).remote(
        tiny_model_dir, cpu_threads=str(i), seed=0) for i in range(2)]
    learner = ray.remote(Learner).options(num_cpus=0.25).remote(
        tiny_model_dir, lr=1e-2, loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="seq_mean"),
        micro_batch_size=16, master_port=29645)
    group = LearnerGroup([learner], gather_on_all_ranks=False, collective=True)
    fleet = GeneratorFleet(gens, group, start_s=60.0, collective=CollectiveSync(1, "gloo", timeout_s=5.0))
    try:
        fleet.ready()
        assert fleet.form_group()
        sampling = Sampling(n=4, temperature=1.0, max_new_tokens=8)
        batch = _batch(fleet.sample(PROMPTS, sampling, seed=1))
        os.kill(ray.get(gens[1].__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
        for version in (1, 2):  # 1: broadcast fails, object store, new group; 2: by broadcast again
            update = group.update(batch, mini_batches=1, aggregation="seq_mean", max_tokens=8, epochs=1)
            fleet.push(update.weights, version=version, broadcast=update.broadcast)
            fleet.settle()
            assert fleet._group is not None and fleet._group.generation == 2  # formed again once
        ro = fleet.sample(PROMPTS, sampling, seed=2)
        assert ro.weight_version == 2
        b2 = TrainBatch.from_rollout(ro, torch.zeros(len(ro)), pad_id=0)
        gap = (ray.get(learner.logprobs.remote(b2)) - b2.old_logprobs).abs() * b2.response_mask
        assert float(gap.max()) < 1e-4
    finally:
        for actor in gens + [learner]:
            ray.kill(actor)


def _generic_reload(worker):
    worker.model_runner.model._grpo_cpu_gemms = []  # [] = vLLM's own reload_weights (engine_weights.py)


def _run_overrides(tmp_path, model_dir, name: str, *extra: str) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:digit_fraction"}) + "\n" for i in range(12)))
    return [f"run.output_dir={tmp_path}", f"run.name={name}", f"model.path={model_dir}", "data.task=jsonl",
            f"data.train_path={data}", "data.eval_fraction=0.25", "rollout.prompts_per_step=4", "algo.group_size=4",
            "train.eval_every=0", "train.eval_at_start=false", "eval.num_prompts=3", "eval.samples=4",
            "eval.ks=[1]", "learner.lr=1e-2", "run.plots=false", *extra]


def _steps(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]


@pytest.mark.slow
def test_the_loop_with_a_tp2_generator_and_collective_sync_learns_as_the_object_store(ray_local, tiny_model_dir,
                                                                                      tmp_path, monkeypatch):
    """3 steps, float32, one step off-policy (rollout.asynchronous: each push is broadcast once
    the rollout sampling ahead is done): TP=2 with sync.method=collective gives the rewards and
    losses of TP=1 with the object store (1e-4): same tokens sampled, same weights received.
    (Sync mode with a collective sync: the kill test below.)"""
    from test_fault_tolerance import _kill_at

    from grpo_ray.driver.train import train

    broadcasts = _kill_at(monkeypatch, "LearnerGroup.broadcast", {}, [], module="grpo_ray.roles.learner_group")
    base = train(load_config("configs/default.yaml", _run_overrides(tmp_path, tiny_model_dir, "store",
                                                                    "train.steps=3", "rollout.asynchronous=true")))
    tp = train(load_config("configs/default.yaml", _run_overrides(
        tmp_path, tiny_model_dir, "tp", "train.steps=3", "rollout.tensor_parallel=2", "sync.method=collective",
        "rollout.asynchronous=true")))
    a, b = _steps(base), _steps(tp)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["reward/mean"] == pytest.approx(x["reward/mean"], abs=1e-4)
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["sampler_kl"] == pytest.approx(x["sampler_kl"], abs=1e-5)  # one update behind, as the store's
    assert broadcasts[0] == 3  # every step's weights went by broadcast, none through the object store
    assert b[-1]["sync/bytes"] == a[-1]["sync/bytes"] > 0
    assert len({r["reward/mean"] for r in b}) > 1  # the policy moved: a run that did not sync would not match


def _kill_a_worker() -> int:
    """SIGKILL one vLLM worker process of a tensor-parallel generator (a child of ray::Generator)."""
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith("ray::Generator"):
            children = p.children()
            if children:
                children[-1].kill()
                return children[-1].pid
    raise AssertionError("no worker process of a tensor-parallel generator")


@pytest.mark.slow
def test_a_killed_tp_worker_restarts_its_generator_and_the_run_finishes(ray_local, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """A worker of the TP=2 engine is killed before step 3's rollout: the generator exits, Ray
    restarts it, the fleet pushes it the current weights (object store), forms a new weight-sync
    group, and every step's samples come from the latest weights. The two learner ranks run
    ZeRO-3: both gather for each broadcast, rank 0 sends."""
    from test_fault_tolerance import _kill_at

    from grpo_ray.driver import rollout
    from grpo_ray.driver.train import train

    killed = []
    original = rollout.sample_and_score
    calls = [0]

    def wrapped(roles, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # once step 2's weights are loaded: a kill mid-broadcast fails the step instead
            roles.fleet.settle()
            killed.append(_kill_a_worker())
        return original(roles, *args, **kwargs)

    monkeypatch.setattr(rollout, "sample_and_score", wrapped)
    resyncs = _kill_at(monkeypatch, "GeneratorFleet.form_group", {}, [], module="grpo_ray.roles.fleet")
    broadcasts = _kill_at(monkeypatch, "LearnerGroup.broadcast", {}, [], module="grpo_ray.roles.learner_group")
    run_dir = train(load_config("configs/default.yaml", _run_overrides(
        tmp_path, tiny_model_dir, "kill", "train.steps=5", "rollout.tensor_parallel=2", "sync.method=collective",
        "learner.zero_stage=3")))
    assert killed
    assert resyncs[0] == 2  # at start, and after the restart
    assert broadcasts[0] == 5  # every step's push by broadcast (the resync's through the object store)
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["weight_version"] for r in steps] == [0, 1, 2, 3, 4]
    assert all(abs(r["sampler_kl"]) < 1e-4 for r in steps)
