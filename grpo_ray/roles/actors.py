"""Where the plain role classes become Ray actors: their place in the roles' placement group
(placement.py), restarts, and the learners' process-group rendezvous.

On a 2-core machine every role asks for a fraction of a CPU: whole-CPU requests can leave a
task unschedulable behind actors that are idle most of the step.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray

from ..config import Config, ConfigError, cpu_list, cpu_threads
from .backends import BACKENDS, full_params_need_all_ranks
from .collective import free_address
from .fleet import CollectiveSync, GeneratorFleet
from .learner_group import LearnerGroup
from .multiturn import EnvRollout
from .placement import Placement, instance_resources, reserve
from .reference_host import GROUP, LearnerReference, ReferenceActor
from .startup import Timeline, in_own_process
from .waiting import Bound

# Every actor process: quiet, offline, one tokenizer thread pool fewer.
# GRPC_ENABLE_FORK_SUPPORT=0: with it on, gRPC's fork handler starts a poller thread in every
# fork()ed child; subprocess then closes the poller's fds and the child aborts before exec. The
# sandbox avoids fork() (setpriv + vfork, see verifiers/sandbox.py); this covers other forks.
# GRPC_VERBOSITY: otherwise gRPC logs a line for every such fork.
# HF_HUB_DISABLE_PROGRESS_BARS: transformers' weight loading and saving bars, one per actor per
# load, said nothing the run's own lines do not.
ACTOR_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "0", "GRPC_VERBOSITY": "ERROR", "TOKENIZERS_PARALLELISM": "false",
             "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Generators only: vLLM's CPU worker warns through torch's C++ log, once per engine, that it binds
# memory to the NUMA node of its cores (which is what resources.vllm_cpu_threads asks for).
# PYTHONWARNINGS: the `reduce_op` FutureWarning the generator filters in-process (_vllm_env), also
# in the worker processes vLLM spawns for rollout.tensor_parallel > 1.
GENERATOR_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR",
                 "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher"}


def in_ray_job() -> bool:
    """True in the entrypoint of `ray job submit` (Ray sets the job config variable there)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def init_ray(address: str | None = None, dashboard: bool = False) -> str | None:
    """Join the cluster at `address` / RAY_ADDRESS / a local `ray start --head`, else start one
    (with Ray's dashboard if `dashboard`). Returns the address of the cluster joined, or None
    when this process started its own."""
    if not ray.is_initialized():
        # the warning that token authentication is on speaks of a cluster this process owns and
        # stops with it: nothing for the user to do (a cluster they start says it to them)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address=address, logging_level="WARNING", log_to_driver=True, include_dashboard=dashboard)
    node = getattr(ray._private.worker, "_global_node", None)
    return None if getattr(node, "head", False) else ray.get_runtime_context().gcs_address


def ray_running() -> bool:
    return ray.is_initialized()


def release_ray() -> None:
    """Leave the cluster this process joined, or stop the Ray it started (raylet, GCS, workers).
    Ray's exit hook does the same but first sleeps 0.5 s for actors' last log lines: called once
    the actors are stopped, it need not."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and getattr(node, "head", False):  # a Ray this process started, not one it joined
        # The local cluster's autoscaler monitor answers SIGTERM by reporting its failure to the
        # GCS, which ray.shutdown stops first, and hangs until Ray's SIGKILL a second later. It
        # keeps no state and has nothing to scale here: killed first.
        try:
            for info in list(node.all_processes.get("monitor", [])):
                info.process.kill()
                info.process.wait(timeout=1)  # as Ray's own bound: a process stuck in the kernel
        except Exception:  # noqa: BLE001 - another Ray's internals, or a stuck monitor: Ray's own way
            pass
    ray.shutdown()


def actor_env() -> dict:
    return dict(ACTOR_ENV)


def _placed(cfg: Config, placement: Placement | None, role: str, index: int = 0, **kw) -> tuple[dict, str, int]:
    """The role instance's actor options (its bundle and share when placed, plus the actor env),
    and its resolved (vLLM CPU ids, torch threads) from role_threads."""
    cpus, gpus = instance_resources(cfg, role)
    where = placement.options(role, index) if placement else dict(num_cpus=cpus, num_gpus=gpus)
    # Ray sets OMP_NUM_THREADS to the actor's CPU count (1 for a fraction), which slowed vLLM's
    # CPU decoding by ~15% here (125 vs 106 ms a step at the tiny size) even with its own threads
    # bound; give OpenMP the threads the role really uses.
    vllm_cpus, torch_threads = role_threads(cfg, placement, role, index)
    threads = len(cpu_list(vllm_cpus)) if role == "generator" else torch_threads
    env = {**actor_env(), **(GENERATOR_ENV if role == "generator" else {}), "OMP_NUM_THREADS": str(max(1, threads))}
    return dict(**where, runtime_env={"env_vars": env}, **kw), vllm_cpus, torch_threads


def role_threads(cfg: Config, placement: Placement | None, role: str, index: int = 0) -> tuple[str, int]:
    """resources.vllm_cpu_threads and torch_threads for one role instance, auto resolved for the
    node its bundle landed on and the instances of its role that share that node (see
    config.cpu_threads). Without a placement group, every instance is on the driver's node."""
    count = {"generator": cfg.rollout.num_generators, "learner": cfg.learner.num_ranks}.get(role, 1)
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if placement is None:
        return cpu_threads(cfg, _node_cpus(here, here), index, count)
    nodes = placement.nodes()
    node = nodes[placement.slot(role, index).bundle]
    peers = [i for i in range(count) if nodes[placement.slot(role, i).bundle] == node]
    return cpu_threads(cfg, _node_cpus(node, here), peers.index(index), len(peers))


def _node_cpus(node: str | None, here: str | None) -> int:
    """CPUs of a node: the driver's own from its CPU affinity (what processes there may use),
    another's from its Ray CPU resource."""
    if node is None or node == here:
        return len(os.sched_getaffinity(0))
    info = next((n for n in ray.nodes() if n["NodeID"] == node), None)
    return int(info["Resources"].get("CPU", 1)) if info else len(os.sched_getaffinity(0))


def _restarts(cfg: Config) -> dict:
    """Stateless or re-syncable roles come back after a crash and the interrupted call is run again."""
    n = cfg.resources.actor_restarts
    return {"max_restarts": n, "max_task_retries": n}


@dataclass
class Roles:
    """The driver's handles on the roles (one owner each: the fleet owns the weight version)."""
    fleet: GeneratorFleet
    verifier: object  # VerifierPool (a Ray Serve deployment, not an actor) or LocalVerifierPool (reward.pool.mode)
    # where the frozen reference runs (reference_host.py); None when nothing needs one (Config.uses_reference)
    reference: ReferenceActor | LearnerReference | None
    learners: LearnerGroup
    placement: Placement | None = None
    bound: Bound = field(default_factory=lambda: Bound(None))  # run.stall_timeout_s: how long a call may stall
    env: EnvRollout | None = None  # multi-turn rollouts (env.name): the env hosts and limits


def start_generators(cfg: Config, model_path: str, placement: Placement | None = None) -> list:
    """rollout.num_generators vLLM actors (not waited for: call .ready())."""
    from .generator import Generator

    gen_cls, actors = ray.remote(in_own_process(Generator)), []
    for i in range(cfg.rollout.num_generators):
        # restarted after a crash (the fleet then pushes the current weights: GeneratorFleet.stream)
        options, cpus, _ = _placed(cfg, placement, "generator", i, **_restarts(cfg))
        actors.append(gen_cls.options(**options).remote(
            model_path, dtype=cfg.model.dtype, max_model_len=cfg.rollout.max_model_len,
            kv_cache_mb=cfg.rollout.kv_cache_mb, seed=cfg.run.seed + i, cpu_threads=cpus,
            enforce_eager=cfg.rollout.enforce_eager, tensor_parallel=cfg.rollout.tensor_parallel,
            lora_rank=cfg.model.lora.rank if cfg.lora and cfg.model.lora.sync == "adapter" else 0,
            gpu_share=placement.slot("generator", i).gpus if placement else cfg.resources.generator_gpus))
    return actors


def start_env_hosts(cfg: Config, tool_pool: str | None) -> EnvRollout | None:
    """env.hosts CPU actors for the environments (none without env.name), outside the placement
    group as the verifier pool's replicas are: they hold no accelerator. Not waited for."""
    if not cfg.env.name:
        return None
    from .env_host import EnvHost

    options = dict(num_cpus=cfg.env.host_cpus, max_concurrency=cfg.env.concurrency,
                   runtime_env={"env_vars": actor_env()}, **_restarts(cfg))
    hosts = tuple(ray.remote(EnvHost).options(**options).remote(tool_pool, cfg.env.max_turns)
                  for _ in range(cfg.env.hosts))
    return env_rollout(cfg, hosts)


def env_rollout(cfg: Config, hosts: tuple) -> EnvRollout:
    """What the generators need to sample multi-turn with these hosts (env section)."""
    from ..envs import EnvSpec

    e = cfg.env
    return EnvRollout(hosts, EnvSpec(e.name, dict(e.options)), max_turns=e.max_turns, turn_tokens=e.turn_tokens,
                      call_timeout_s=e.call_timeout_s)


def reference_options(cfg: Config) -> dict:
    """The Reference's keyword arguments besides its folder and threads (roles/reference.py)."""
    return dict(dtype=cfg.model.dtype, share_prompts=cfg.model.share_prompts,
                micro_batch_size=cfg.learner.micro_batch_size, temperature=cfg.rollout.temperature)


def start_reference(cfg: Config, model_path: str, placement: Placement | None = None) -> ReferenceActor:
    """The reference actor (not waited for). Stateless: a crash restart reloads model_path."""
    from .reference import Reference

    options, _, threads = _placed(cfg, placement, "reference", **_restarts(cfg))
    return ReferenceActor(ray.remote(in_own_process(Reference)).options(**options).remote(model_path, threads=threads,
                                                                           **reference_options(cfg)))


def _rendezvous(placement: Placement) -> tuple[str, int]:
    """MASTER_ADDR/PORT of the learners' process group: rank 0's node, which hosts the store.
    One node: the driver's. Several: a zero-CPU task in rank 0's bundle looks it up."""
    if len([n for n in ray.nodes() if n["Alive"]]) == 1:
        return free_address()
    where = placement.options("learner", 0)
    where.update(num_cpus=0, num_gpus=0)
    return ray.get(ray.remote(free_address).options(**where).remote())


def start_learners(cfg: Config, model_path: str, placement: Placement, reference: str | None = None) -> list:
    """learner.num_ranks DeepSpeed ranks, one process group (not waited for). reference: the
    folder of the reference each rank hosts (resources.reference_host=learner), in a concurrency
    group of its own (reference_host.py)."""
    from .learner import Learner

    a = cfg.algo
    loss_kwargs = dict(eps_low=a.epsilon, eps_high=cfg.epsilon_high, beta=a.beta, aggregation=a.aggregation,
                       clip_ratio_c=a.clip_ratio_c, entropy_coef=a.entropy_coef)
    master_addr, master_port = _rendezvous(placement)
    hosted = dict(model_path=reference, **reference_options(cfg)) if reference else None
    learner = in_own_process(Learner)
    learner_cls, actors = ray.remote(concurrency_groups={GROUP: 1})(learner) if hosted else ray.remote(learner), []
    for rank in range(cfg.learner.num_ranks):
        options, _, threads = _placed(cfg, placement, "learner", rank, max_restarts=0)
        actors.append(learner_cls.options(**options).remote(
            model_path, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay, grad_clip=cfg.learner.grad_clip,
            backend=cfg.learner.backend, zero_stage=cfg.learner.zero_stage, warmup_steps=cfg.learner.warmup_steps, dtype=cfg.model.dtype,
            loss_kwargs=loss_kwargs, micro_batch_size=cfg.learner.micro_batch_size, rank=rank,
            world_size=cfg.learner.num_ranks, master_addr=master_addr, master_port=master_port,
            threads=threads, seed=cfg.run.seed, recompute_old_logprobs=a.recompute_old_logprobs, tis=a.tis,
            tis_cap=a.tis_cap, share_prompts=cfg.model.share_prompts, temperature=cfg.rollout.temperature,
            lora=cfg.model.lora.model_dump(exclude={"sync"}) if cfg.lora else None, base_reference=cfg.needs_reference,
            sync_adapter=cfg.lora and cfg.model.lora.sync == "adapter", reference=hosted))
    return actors


def check_backend(cfg: Config) -> None:
    """learner.backend names a registered training backend (before any actor starts)."""
    if cfg.learner.backend not in BACKENDS:
        raise ConfigError(f"learner.backend={cfg.learner.backend!r}: allowed values are "
                          f"{', '.join(map(repr, BACKENDS))} (registered in grpo_ray/roles/backends/__init__.py)")


def start_roles(cfg: Config, model_path: str, resume_from: str | None = None, reference: str | None = None,
                timeline: Timeline | None = None) -> Roles:
    """Reserve the roles' placement group, then create every actor and wait until all are ready
    (vLLM, DeepSpeed and the verifier pool start in parallel). resume_from: a checkpoint
    directory; the learners restore its state (the generators start from model_path and get its
    weights pushed: Run.restore).
    reference: the reference policy's folder (the initial model unless algo.ref_reset_every has
    replaced it). timeline: gets each phase and each actor's own start-up marks.
    Raises placement.PlacementError when the cluster cannot hold the roles."""
    from .local_verifier import start_verifier

    timeline = timeline or Timeline()
    with timeline.phase("placement group"):
        placement = reserve(cfg)
    verifier, env, t0 = None, None, time.perf_counter()
    try:
        created = time.time()
        generators = start_generators(cfg, model_path, placement)
        reference_dir, reference = reference or model_path, None
        if cfg.reference_actor:
            reference = start_reference(cfg, reference_dir, placement)
        learners = start_learners(cfg, model_path, placement,
                                  reference_dir if cfg.reference_in_learners else None)
        own = reference.actors if reference else []  # the reference's own actor, if it has one
        # blocks until its replicas run, while the actors start
        with timeline.phase("verifier pool (Serve)" if cfg.reward.pool.mode == "serve" else "verifiers (local)"):
            verifier = start_verifier(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
        env = start_env_hosts(cfg, verifier.app)
        restored = [lr.load_state.remote(os.path.join(resume_from, "learner")) for lr in learners] if resume_from else []
        with timeline.phase("waiting for the actors"):
            ray.get([g.ready.remote() for g in generators] + [lr.__ray_ready__.remote() for lr in learners]
                    + [a.__ray_ready__.remote() for a in own] + restored
                    + [h.__ray_ready__.remote() for h in (env.hosts if env else ())])
        named = ([(f"generator {i}", g) for i, g in enumerate(generators)] + [("reference", a) for a in own]
                 + [(f"learner {r}", lr) for r, lr in enumerate(learners)])
        for (name, _), marks in zip(named, ray.get([a.startup.remote() for _, a in named])):
            timeline.add_role(name, created, marks)
        bound = Bound(cfg.run.stall_timeout_s)
        group = LearnerGroup(learners, gather_on_all_ranks=full_params_need_all_ranks(cfg.learner.backend,
                                                                                    cfg.learner.zero_stage),
                             dtype=cfg.model.dtype, bound=bound, lora=cfg.lora,
                             collective=cfg.sync.method == "collective")
        if cfg.reference_in_learners:
            reference = LearnerReference(learners, group.names)
        fleet = GeneratorFleet(generators, group, bound, start_s=time.perf_counter() - t0,
                               collective=collective_sync(cfg))
        fleet.locate()  # the engines are up (awaited above): where each runs, for the stall messages
        if fleet.collective is not None:
            with timeline.phase("weight-sync group"):
                fleet.form_group()
    except BaseException:  # an error or a stop (SIGTERM) anywhere up to here: nothing left on the cluster
        placement.remove()  # kills the actors placed in it
        for host in env.hosts if env else ():  # outside it
            ray.kill(host)
        if verifier is not None:
            verifier.shutdown()
        raise
    return Roles(fleet, verifier, reference, group, placement, bound, env)


def collective_sync(cfg: Config) -> CollectiveSync | None:
    """sync.method=collective's group settings: NCCL when the learners and generators are on
    GPUs of their own, else gloo (NCCL refuses two members on one GPU, as resources.colocate=all
    puts generator 0 with learner rank 0; gloo moves host buffers). None: the object store."""
    if cfg.sync.method != "collective":
        return None
    res = cfg.resources
    gpus = res.generator_gpus > 0 and res.learner_gpus > 0 and res.colocate != "all"
    return CollectiveSync(cfg.rollout.tensor_parallel, "nccl" if gpus else "gloo", cfg.sync.timeout_s)


def replace_reference(roles: Roles, cfg: Config, model_path: str) -> None:
    """The reference from the model folder `model_path` (a reference reset, or a rollback to a
    checkpoint that names another one): its actor restarted, or the learner ranks' copies
    reloaded; awaited."""
    if isinstance(roles.reference, LearnerReference):
        roles.reference.reload(model_path, reference_options(cfg), roles.bound)
        return
    # the old actor goes first: the new one takes its place in the placement group
    ray.kill(roles.reference.actor)
    roles.reference = start_reference(cfg, model_path, roles.placement)
    ray.get(roles.reference.actor.__ray_ready__.remote())


def restart_reference(roles: Roles) -> None:
    """Kill a stalled reference actor; Ray starts it again from its model folder
    (resources.actor_restarts), and the next call waits for it to be ready (a reference in the
    learner ranks is not restartable: they have no restarts)."""
    ray.kill(roles.reference.actor, no_restart=False)
    ray.get(roles.reference.actor.__ray_ready__.remote())


def stop_roles(roles: Roles) -> None:
    roles.verifier.shutdown()
    roles.fleet.close()  # the generators' own files (a LoRA adapter's folder), before they are killed
    own = roles.reference.actors if roles.reference else []
    for actor in roles.fleet.actors + own + roles.learners.actors + list(roles.env.hosts if roles.env else ()):
        if actor is not None:
            ray.kill(actor)
    if roles.placement is not None:
        roles.placement.remove()
