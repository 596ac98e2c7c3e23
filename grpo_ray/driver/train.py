"""The driver: one GRPO run over Ray actors, readable top to bottom: preflight, start the actors,
Run.loop (run.py), release them. Each step (step.py):

    generate -> verify -> advantages -> reference logprobs -> learner update -> weight sync -> log

and between steps: evaluate, checkpoint, watch the KL (stop or roll back), reset the reference.
Run as `grpo-ray train configs/default.yaml [dotted.key=value ...]` or `python -m grpo_ray train ...`.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..data.datasets import PromptSampler, drop_training_prompts, load_datasets, source_of, task_problem
from ..models.lora import check_serving, check_targets
from ..models.modeling import check_model_dir, load_tokenizer
from ..roles.actors import Roles, check_backend, init_ray, ray_running, release_ray, start_roles, stop_roles
from ..roles.startup import Timeline
from .checkpoint import check_resume_mode, find_resume, list_checkpoints, lora_state, remove_partial_saves
from .evaluation import EvalSet, eval_sets
from .outputs import create_run_dir, fit_records, fit_to_model, prepare_model, resolve_run_dir, stopped_where
from .run import Run
from .signals import Stopped, stop_on_signals
from .tracking import Tracker


@dataclass
class Prepared:
    """What preflight hands the run: nothing of it has been written or started yet."""
    train_records: list[dict]
    eval_sets: list[EvalSet]  # the main held-out set first (eval/pass@k), then eval.sets
    dropped: str | None  # a warning about held-out rows that were training prompts
    model_path: str
    resume: tuple[str, dict] | None  # (checkpoint, its state) to continue from


def preflight(cfg: Config, log) -> Prepared:
    """Everything that can refuse the run, before anything is written (config.yaml included) or
    started."""
    train_records, eval_records = load_datasets(cfg.data, cfg.run.seed)
    # pass@k on prompts the policy trains on measures memory, not generalisation (a file split by
    # data.eval_fraction puts a duplicated row on both sides; an eval_path may repeat train rows)
    eval_records, dropped = drop_training_prompts(eval_records, train_records, cfg.data.train_path or "the task")
    for name in cfg.reward.components:  # a component no one can import would score 0 every step
        problem = task_problem({"task": name}) if ":" in name else None
        if problem:
            raise ConfigError(f"reward.components: {problem}")
    check_backend(cfg)
    if not cfg.env.name and (row := next((r for r in train_records + eval_records if r.get("env")), None)):
        raise ConfigError(f"{source_of(row) or 'a row'} names env {row['env']!r}, but env.name is empty, so no env "
                          "hosts would run it: set env.name (the environment of rows without their own)")
    if cfg.model.path != "builtin:tiny":
        check_model_dir(cfg.model.path, max_model_len=cfg.rollout.max_model_len,
                        tensor_parallel=cfg.rollout.tensor_parallel)
    run_dir = resolve_run_dir(cfg)
    check_resume_mode(run_dir, cfg.run.resume)
    model_path = prepare_model(cfg, train_records, run_dir, log)  # builtin:tiny: built in the cache beside run dirs
    if cfg.lora:  # a target the model does not have would fail in every learner rank
        check_targets(model_path, cfg.model.lora.target_modules)
        if cfg.model.lora.sync == "adapter":  # an adapter vLLM cannot load would fail in every generator
            check_serving(model_path)
    # a prompt the model cannot take would crash vLLM at the step that first draws it
    train_records, eval_records = fit_to_model(cfg, model_path, train_records, eval_records, log)
    # once for every eval set read from a file (transformers' import and a tokenizer: ~3 s on 2 cores)
    tokenizer = load_tokenizer(model_path) if any(s.path for s in cfg.eval.sets) else None
    sets = eval_sets(cfg, eval_records, train_records, lambda rows, name: fit_records(cfg, tokenizer, rows, name, log))
    # a checkpoint of another model, or of other model.lora settings: refused here
    resume = find_resume(run_dir, cfg.run.resume, model_path, lora_state(cfg))
    return Prepared(train_records, sets, dropped, model_path, resume)


def train(cfg: Config, address: str | None = None) -> str:
    """Run GRPO as configured (resuming from the run's last checkpoint when there is one and
    run.resume allows); returns the run directory. SIGTERM and SIGINT raise Stopped (its
    `where` says how to resume) after the actors are released. Ray: joined at `address` (or
    RAY_ADDRESS, or a head this machine started), else started for the run; either is stopped
    (left) at the end of a run that ended well. A Ray the caller had initialised is left as it is."""
    from tqdm import tqdm

    log, timeline = tqdm.write, Timeline()
    timeline.add("interpreter, imports, config", timeline.zero, time.time())
    # Bad data, a model that cannot take a prompt and bad checkpoints fail here, before anything
    # is written or started.
    with timeline.phase("data, model check, warm start"):
        prepared = preflight(cfg, log)
    run_dir = create_run_dir(cfg)
    log(f"run directory: {run_dir}")
    if prepared.dropped:
        log(f"warning: {prepared.dropped}")
    remove_partial_saves(run_dir)
    stop_ray = not ray_running()  # else the caller's (a test's, a notebook's): left as it is
    with timeline.phase("ray start or connect"):
        joined = init_ray(address, dashboard=cfg.run.ray_dashboard)
    if joined:  # its actors, dashboard and logs are there, and outlive this run
        log(f"joined the running Ray cluster at {joined}")
    try:
        with stop_on_signals():
            _run(cfg, run_dir, prepared, log, tqdm, timeline, stop_ray)
    except Stopped as e:
        e.where = stopped_where(run_dir, cfg.train.steps)
        raise
    first = timeline.at("first step")
    timeline.save(os.path.join(run_dir, "timings.json"), time_to_first_step_s=first,
                  until_exit_s=round(time.time() - timeline.zero, 3))
    log(f"run directory: {run_dir}")
    return run_dir


def _run(cfg: Config, run_dir: str, prepared: Prepared, log, tqdm, timeline: Timeline, stop_ray: bool) -> None:
    """Start the actors, run the steps, release the actors (also on an error or a stop). stop_ray:
    the Ray that train() started, or the cluster it joined, is stopped (left) after a run that
    ended well, while the plots are drawn (after an error, Ray's exit hook does it once the
    actors' last lines are printed)."""
    model_path, resume = prepared.model_path, prepared.resume
    reference = (resume[1].get("reference") if resume else None) or model_path
    t0 = time.perf_counter()
    # the driver's own set-up (TensorBoard's imports) runs while the actors start
    side = ThreadPoolExecutor(1)
    outputs = side.submit(open_outputs, cfg, run_dir)
    side.shutdown(wait=False)  # its thread ends with that one task
    run: Run | None = None
    with contextlib.ExitStack() as cleanup:  # in reverse order, on any exit: an error, a stop (SIGTERM)
        cleanup.callback(close_outputs, outputs)
        with timeline.phase("actors"):
            roles = start_roles(cfg, model_path, resume_from=resume[0] if resume else None,
                                reference=reference, timeline=timeline)
        cleanup.callback(lambda: run is not None and run.plotted())  # drawn while the actors and Ray stop
        if stop_ray:
            cleanup.push(ray_released(timeline, log))
        cleanup.callback(stop_actors, roles, timeline)
        log(f"actors ready in {time.perf_counter() - t0:.1f}s: {cfg.rollout.num_generators} generator(s), "
            + (f"verifier pool ({cfg.reward.pool.min_replicas}-{cfg.reward.pool.max_replicas} replicas), "
               if cfg.reward.pool.mode == "serve" else "verifiers in this process, ")
            + ("reference, " if cfg.reference_actor else "") + f"{cfg.learner.num_ranks} learner rank(s)"
            + (" (the reference in them)" if cfg.reference_in_learners else ""))
        trainable, total = roles.learners.parameter_counts()
        lora = cfg.model.lora
        log(f"policy: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3g}M trained" + (
            f" (LoRA rank {lora.rank} on {', '.join(lora.target_modules)}; the base with the adapter off is the "
            "reference)" if cfg.lora else ""))
        metrics = outputs.result()
        run = Run(cfg, roles, run_dir, model_path, PromptSampler(prepared.train_records, cfg.run.seed),
                  prepared.eval_sets, log, reference, timeline, metrics)
        run.loop(run.restore(*resume) if resume else 1, tqdm)


def ray_released(timeline: Timeline, log):
    """An exit callback (ExitStack.push) that stops or leaves Ray after a run that ended well."""
    def release(error_type, *_) -> bool:
        if error_type is None:
            with timeline.phase("ray shut-down"):
                try:
                    release_ray()
                except Exception as e:  # noqa: BLE001 - the run is done and saved; its exit hook tries again
                    log(f"warning: Ray did not shut down cleanly ({type(e).__name__}: {e})")
        return False  # an error goes on
    return release


def stop_actors(roles: Roles, timeline: Timeline) -> None:
    with timeline.phase("stop actors"):
        stop_roles(roles)


def close_outputs(outputs: Future) -> None:
    """Close the metrics sinks open_outputs opened (none when it failed; its error is raised
    where its result was asked for)."""
    if outputs.exception() is None:
        outputs.result().close()


def open_outputs(cfg: Config, run_dir: str) -> Tracker:
    """The metrics sinks: metrics.jsonl appends on resume. No tokenizer: the driver pads with the
    generators' pad id (GeneratorFleet.pad_id) and the learner saves the tokenizer with a policy."""
    return Tracker(
        run_dir, tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project or None,
        run_name=cfg.run.name, config=cfg.to_dict(), resumed=bool(list_checkpoints(run_dir)))
