"""One typed, validated config tree, loaded from configs/*.yaml plus dotted command-line
overrides (`algo.beta=0.01`). Unknown keys and bad values are errors that name the dotted key,
the value and what is allowed. Defaults follow the DeepSeek-R1 recipe (arXiv:2501.12948).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


def _f(default, *, lo=None, hi=None, lo_open=False, doc=""):
    """A field with bounds checked at load time (lo_open: value must be > lo, not >=)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = _f("runs", doc="relative paths resolve against the cwd (under `ray job submit`: ~/grpo-ray)")
    seed: int = 0
    log_every: int = _f(1, lo=1)
    resume: Literal["auto", "must", "never"] = "auto"  # auto: continue from the run dir's last checkpoint if any
    tensorboard: bool = True  # event files in <run dir>/tensorboard
    wandb_project: str = _f("", doc="Weights & Biases project; empty = off (needs `pip install wandb`)")
    plots: bool = True  # PNG charts in <run dir>/plots at the end (also: grpo-ray plot RUN_DIR)


@dataclass
class ModelConfig:
    path: str = _f("builtin:tiny", doc="a Hugging Face model folder, or builtin:tiny (built and warm-started locally)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    share_prompts: bool = _f(True, doc="run each prompt once per group in the reference and learner passes "
                                   "(its KV cache serves the group's completions); false: every row whole")
    hidden_size: int = _f(128, lo=32)  # builtin:tiny only
    num_layers: int = _f(2, lo=1)
    num_heads: int = _f(4, lo=1)


@dataclass
class WarmStartConfig:
    """Supervised warm start of builtin:tiny: GRPO needs a base model that is sometimes right."""
    steps: int = _f(1500, lo=0)
    batch_size: int = _f(64, lo=1)
    lr: float = _f(3e-3, lo=0.0, lo_open=True)
    show_work: float = _f(0.3, lo=0.0, hi=1.0, doc="fraction of SFT examples that show their work")
    label_noise: float = _f(0.9, lo=0.0, hi=1.0, doc="fraction of hasty SFT answers that are random guesses")


@dataclass
class DataConfig:
    task: Literal["arithmetic", "jsonl"] = "arithmetic"
    train_path: str = ""  # jsonl only
    eval_path: str = ""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = _f("{prompt}", doc="what the generators see; {prompt} is the row's prompt, e.g. "
                                               "'{prompt}\\nPut the final answer after ####.'")
    verifier: str = _f("math", doc="scores rows without a `task` field: math, code, or module:function")
    max_operand: int = _f(49, lo=1)  # arithmetic only
    eval_fraction: float = _f(0.1, lo=0.0, hi=0.9, lo_open=True)


@dataclass
class AlgoConfig:
    group_size: int = _f(16, lo=2, doc="completions per prompt (DeepSeek-R1: 16)")
    epsilon: float = _f(10.0, lo=0.0, lo_open=True, doc="clip range (DeepSeek-R1: 10; PPO: 0.2)")
    epsilon_high: float | None = _f(None, lo=0.0, lo_open=True, doc="upper clip; null = epsilon")
    beta: float = _f(0.001, lo=0.0, doc="k3 KL coefficient in the loss")
    kl_stop: float | None = _f(0.1, lo=0.0, lo_open=True,
                               doc="stop when the KL (median of the last kl_window steps) exceeds this; null = "
                                   "no KL guard (with beta 0: no reference actor, no reference pass)")
    kl_window: int = _f(5, lo=1, doc="steps in the KL stop rule's median; 1 = stop on any single step")
    kl_action: Literal["stop", "rollback"] = "stop"  # rollback: last checkpoint, lower lr, go on
    kl_rollback_lr_factor: float = _f(0.5, lo=0.0, hi=1.0, lo_open=True, doc="lr multiplier per rollback")
    kl_max_rollbacks: int = _f(2, lo=0, doc="then the run stops")
    estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    aggregation: Literal["seq_mean", "token_mean", "constant"] = "seq_mean"
    clip_ratio_c: float | None = _f(None, lo=1.0, lo_open=True, doc="dual clip for A < 0; null = off")
    ref_reset_every: int = _f(0, lo=0, doc="reset the reference to the current policy every N steps "
                                          "(DeepSeek-R1: 400); 0 = never")
    ppo_epochs: int = _f(1, lo=1, doc="passes over each rollout (mu in DeepSeekMath)")
    mini_batches: int = _f(1, lo=1, doc="optimizer steps per pass; DeepSeek-R1 splits a rollout into 16")
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards, refill with new prompts
    dynamic_sampling_rounds: int = _f(3, lo=0, doc="extra generation rounds to refill the batch")
    overlong: Literal["none", "mask", "penalty"] = "none"  # truncated completions: train on, mask, or DAPO penalty
    overlong_buffer: int | None = _f(None, lo=1, doc="DAPO L_cache in tokens; null = max_new_tokens // 5")
    overlong_penalty_factor: float = _f(1.0, lo=0.0)
    recompute_old_logprobs: bool = False  # learner recomputes old logprobs (the sampler's kept for TIS)
    tis: Literal["none", "token", "sequence"] = "none"  # truncated importance sampling vs the sampler
    tis_cap: float = _f(2.0, lo=1.0, doc="truncation C of the importance weights")
    entropy_coef: float = _f(0.0, lo=0.0, doc="entropy bonus in the loss; 0 = off (entropy is logged anyway)")


@dataclass
class MathRewardConfig:
    extraction: Literal["boxed", "marked", "any"] = "any"  # marked: \\boxed{} or ####; any: also the last number
    timeout_s: float = _f(5.0, lo=0.0, lo_open=True, doc="math-verify time limit per comparison")


@dataclass
class CodeRewardConfig:
    timeout_s: float = _f(2.0, lo=0.0, lo_open=True, doc="wall clock per check; a record's timeout_s wins")
    memory_mb: int = _f(512, lo=64, doc="address-space limit of the sandboxed program")
    partial_credit: bool = False  # reward = fraction of assertions that hold, instead of all-or-nothing
    # without a working bubblewrap (user namespaces allowed) code checks refuse to run;
    # true runs them with rlimits and uid 65534 only: NOT isolated (network, world-readable files)
    allow_unsandboxed: bool = False


@dataclass
class VerifierPoolConfig:
    """The Ray Serve deployment that scores completions (autoscaling_config comes from here)."""
    min_replicas: int = _f(1, lo=1)
    max_replicas: int = _f(4, lo=1)
    target_ongoing_requests: float = _f(2.0, lo=0.0, lo_open=True, doc="per replica; more in flight scales up")
    max_ongoing_requests: int = _f(4, lo=1, doc="requests one replica works on at once (threads)")
    upscale_delay_s: float = _f(2.0, lo=0.0)
    downscale_delay_s: float = _f(20.0, lo=0.0)
    chunk_size: int = _f(0, lo=0, doc="completions per request; 0 = auto: about target_request_s of work each")
    target_request_s: float = _f(0.25, lo=0.0, lo_open=True, doc="work per request when chunk_size is 0")
    request_timeout_s: float = _f(120.0, lo=0.0, lo_open=True, doc="a request still unanswered is sent again; "
                                  "a replica stops its math comparisons in time to answer")
    max_retries: int = _f(3, lo=0, doc="resends of a request whose replica died or timed out")
    replica_cpus: float = _f(0.1, lo=0.0)
    verifier_resource: float = _f(1.0, lo=0.0, doc="custom resource 'verifier' per replica, when the cluster has one")
    # auto: replicas need `verifier` when the cluster has some when the run starts; require: always
    # (an autoscaler that starts verifier nodes from zero only adds them for a pending demand);
    # none: never (replicas go wherever CPUs are free)
    verifier_nodes: Literal["auto", "require", "none"] = "auto"


@dataclass
class RewardConfig:
    # name -> weight; names: correct (the task's verifier), format (<think>/<answer>), module:function
    # merged into the default; a weight of 0 turns a component off
    components: dict = _f({"correct": 1.0}, doc="weighted sum of reward components")
    math: MathRewardConfig = field(default_factory=MathRewardConfig)
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    pool: VerifierPoolConfig = field(default_factory=VerifierPoolConfig)


@dataclass
class RolloutConfig:
    prompts_per_step: int = _f(16, lo=1)
    temperature: float = _f(1.0, lo=0.0, lo_open=True)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    max_new_tokens: int = _f(16, lo=1)
    num_generators: int = _f(1, lo=1)
    max_model_len: int = _f(512, lo=16)
    kv_cache_mb: int = _f(256, lo=16)
    # true: vLLM runs the model eagerly. false: CUDA graphs on GPUs (faster decoding); on the CPU,
    # vLLM compiles the model with inductor: measured here (2026-11-26, one process, alternating),
    # sampling 8 x 16 answers took 0.16 -> 0.14 s (tiny) and 5.7 -> 5.5 s (small, 128 tokens), for
    # 0-6 s more start-up per engine with a warm compile cache (~/.cache/vllm), 28-37 s without:
    # worth it on long CPU runs, not on the 20-step default job.
    enforce_eager: bool = True
    asynchronous: bool = _f(False, doc="one step off-policy: step n+1's rollout is sampled while step n trains")


@dataclass
class LearnerConfig:
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    warmup_steps: int = _f(5, lo=0, doc="linear learning-rate warm-up, in optimizer steps")
    weight_decay: float = _f(0.0, lo=0.0)
    grad_clip: float = _f(1.0, lo=0.0)
    micro_batch_size: int = _f(64, lo=1)
    zero_stage: int = _f(0, lo=0, hi=3)
    num_ranks: int = _f(1, lo=1)


@dataclass
class TrainConfig:
    steps: int = _f(60, lo=0)
    eval_every: int = _f(20, lo=0, doc="0 = only at start and end")
    checkpoint_every: int = _f(50, lo=0, doc="0 = only at the end")
    keep_checkpoints: int = _f(2, lo=1, doc="newest checkpoints kept; older ones are deleted")
    spot_check_every: int = _f(10, lo=0, doc="write samples/step_N.{jsonl,md} every N steps; 0 = never")
    spot_check_samples: int = _f(8, lo=1)


@dataclass
class EvalConfig:
    num_prompts: int = _f(64, lo=1)
    samples: int = _f(16, lo=1, doc="completions per prompt for unbiased pass@k")
    ks: list = _f([1, 10])
    temperature: float = _f(1.0, lo=0.0, lo_open=True)


@dataclass
class ResourcesConfig:
    """What each role instance asks Ray for. The roles are reserved together in one placement
    group (grpo_ray/roles/placement.py): a bundle per learner rank, generator and the reference, or
    shared bundles when co-located. Fractional CPUs by default: on 2 cores, whole-CPU requests
    can starve other actors into a hang. On GPU nodes: 1 GPU per learner rank and generator."""
    generator_cpus: float = _f(0.25, lo=0.0, lo_open=True)
    learner_cpus: float = _f(0.25, lo=0.0, lo_open=True)
    reference_cpus: float = _f(0.25, lo=0.0, lo_open=True)
    generator_gpus: float = _f(0.0, lo=0.0, hi=1.0, doc="GPUs per vLLM generator (one engine per GPU at most)")
    learner_gpus: float = _f(0.0, lo=0.0, hi=1.0, doc="GPUs per learner rank (DeepSpeed: one device per rank)")
    reference_gpus: float = _f(0.0, lo=0.0, hi=1.0)
    colocate: Literal["none", "learner_reference", "all"] = _f(
        "none", doc="none: a bundle per actor; learner_reference: the reference shares learner rank 0's bundle; "
                    "all: generators and the reference share the learner ranks' bundles (and their GPUs)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", doc="Ray placement-group strategy over the bundles: PACK fills few nodes, SPREAD keeps them apart")
    placement_timeout_s: float = _f(120.0, lo=0.0, lo_open=True,
                                    doc="how long to wait for the cluster (or its autoscaler) to fit every role")
    torch_threads: int = _f(0, lo=0, doc="intra-op threads of the learner and reference; 0 = auto (see cpu_threads)")
    actor_restarts: int = _f(3, lo=0, doc="restarts of a crashed generator or reference actor (learners: none; "
                                          "resume from a checkpoint instead)")
    vllm_cpu_threads: str = _f("auto", doc="CPU ids for vLLM's CPU backend, like 0-3,8; auto: see cpu_threads")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def uses_reference(self) -> bool:
        """Whether anything needs the frozen reference: the KL term (beta > 0) or the KL guard. With
        beta 0 and kl_stop null (DAPO, Dr. GRPO) no reference actor runs: TRL and verl skip theirs
        the same way, which saves a forward pass over every rollout and a model's memory."""
        return self.algo.beta > 0 or self.algo.kl_stop is not None

    @property
    def epsilon_high(self) -> float:
        return self.algo.epsilon if self.algo.epsilon_high is None else self.algo.epsilon_high

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """Check value against the annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} ({source}): allowed values are {', '.join(map(repr, args))}")
        return value
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # run.name=123
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[typ if typ in (bool, int, float, str, dict) else list]
    if not ok(value):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key}={value!r} ({source}): expected {name}, got {type(value).__name__}")
    return float(value) if typ is float else value


def _check_bounds(key: str, value: Any, meta: dict, source: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} ({source}): must be a finite number{_doc(meta)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{key}={value!r} ({source}): must be {op} {lo}{_doc(meta)}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} ({source}): must be <= {hi}{_doc(meta)}")


def _doc(meta: dict) -> str:
    return f" ({meta['doc']})" if meta.get("doc") else ""


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} ({source}): expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for k, v in data.items():
        key = prefix + str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{key}' ({source}){hint}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v, key + ".", source)
            continue
        value = _coerce(key, v, hints[k], source)
        _check_bounds(key, value, fields[k].metadata, source)
        if isinstance(current, dict):  # mappings merge: reward.components.format=0.1 keeps "correct"
            value = {**current, **value}
        setattr(obj, k, value)


def _validate(cfg: Config) -> None:
    """Checks that span several keys."""
    from .verifiers import check_components

    if not cfg.reward.components:
        raise ConfigError("reward.components is empty; e.g. {correct: 1.0}")
    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"run.name={name!r}: expected one folder name (the run directory is "
                          f"run.output_dir/run.name), e.g. gsm8k-lr1e-6")
    if not cfg.uses_reference and (cfg.algo.ref_reset_every or cfg.algo.kl_action == "rollback"):
        key = (f"algo.ref_reset_every={cfg.algo.ref_reset_every}" if cfg.algo.ref_reset_every
               else "algo.kl_action=rollback")
        raise ConfigError(f"{key} needs a reference policy, but algo.beta=0 with algo.kl_stop=null runs none; "
                          "set algo.kl_stop (e.g. 0.1) to keep the KL guard and its reference")
    try:
        check_components(cfg.reward.components)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pool = cfg.reward.pool
    if pool.max_replicas < pool.min_replicas:
        raise ConfigError(f"reward.pool.max_replicas={pool.max_replicas} is below reward.pool.min_replicas="
                          f"{pool.min_replicas}; raise max_replicas or lower min_replicas")
    if "{prompt}" not in cfg.data.prompt_template:
        raise ConfigError(f"data.prompt_template={cfg.data.prompt_template!r} has no {{prompt}}: the row's prompt "
                          "would not reach the model")
    if cfg.data.task == "jsonl" and not cfg.data.train_path:
        raise ConfigError("data.task='jsonl' needs data.train_path (a .jsonl file with prompt and answer fields)")
    if cfg.model.path == "builtin:tiny" and cfg.data.task != "arithmetic":
        raise ConfigError("model.path='builtin:tiny' is warm-started on the arithmetic task; set data.task=arithmetic "
                          "or point model.path at a Hugging Face model folder")
    if not cfg.eval.ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks={cfg.eval.ks!r}: expected a list of integers >= 1")
    if max(cfg.eval.ks) > cfg.eval.samples:
        raise ConfigError(f"eval.ks={cfg.eval.ks!r} needs eval.samples >= {max(cfg.eval.ks)} "
                          f"(pass@k is estimated from `samples` completions), got {cfg.eval.samples}")
    rows, parts = cfg.rollout.prompts_per_step * cfg.algo.group_size, cfg.algo.mini_batches * cfg.learner.num_ranks
    if rows % parts:
        raise ConfigError(f"algo.mini_batches * learner.num_ranks = {parts} must divide rollout.prompts_per_step * "
                          f"algo.group_size = {rows} (every rank takes an equal share of every mini-batch)")
    try:
        if cfg.resources.vllm_cpu_threads != "auto" and not cpu_list(cfg.resources.vllm_cpu_threads):
            raise ValueError("no CPU ids")
    except ValueError:
        raise ConfigError(f"resources.vllm_cpu_threads={cfg.resources.vllm_cpu_threads!r}: expected CPU ids like "
                          "'0-1' or '0-3,8', or auto") from None
    if cfg.rollout.asynchronous and cfg.algo.recompute_old_logprobs and cfg.algo.tis == "none":
        raise ConfigError("rollout.asynchronous=true with algo.recompute_old_logprobs=true needs algo.tis=token or "
                          "sequence: the recomputed old logprobs are the learner's, one update past the sampler, "
                          "and only the importance weights against the sampler's correct for that lag")
    if cfg.learner.num_ranks > 1 and 0 < cfg.resources.learner_gpus < 1:
        raise ConfigError(f"resources.learner_gpus={cfg.resources.learner_gpus} with learner.num_ranks="
                          f"{cfg.learner.num_ranks}: two ranks could share one GPU, which NCCL refuses; use 1 "
                          "(or 0 on CPUs)")
    if cfg.data.verifier not in ("math", "code") and ":" not in cfg.data.verifier:
        raise ConfigError(f"data.verifier={cfg.data.verifier!r}: expected math, code, or module:function")
    if cfg.rollout.asynchronous and cfg.algo.dynamic_sampling:
        raise ConfigError("rollout.asynchronous=true does not work with algo.dynamic_sampling=true yet (the extra "
                          "rounds would be sampled with other weights); turn one of them off")
    if cfg.rollout.max_new_tokens >= cfg.rollout.max_model_len:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for the prompt in "
                          f"rollout.max_model_len={cfg.rollout.max_model_len} (vLLM stops an answer there, so the "
                          "truncation metrics and overlong handling would be off): raise rollout.max_model_len "
                          "to the longest prompt plus max_new_tokens, or lower max_new_tokens")
    if cfg.rollout.top_p < 1.0 and not cfg.algo.recompute_old_logprobs:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} samples from the renormalised nucleus, so the sampler's "
                          "logprobs (old_logprobs) are not the full softmax the learner computes: the ratio would "
                          "start below 1 and the clip act on that gap. Set algo.recompute_old_logprobs=true "
                          "algo.tis=token (importance weights against the sampler), or rollout.top_p=1.0")
    if cfg.algo.tis != "none" and not cfg.algo.recompute_old_logprobs:
        raise ConfigError(f"algo.tis={cfg.algo.tis!r} needs algo.recompute_old_logprobs=true: the importance "
                          "weights compare the learner's old logprobs with the sampler's")
    if cfg.algo.overlong == "penalty" and overlong_buffer(cfg) > cfg.rollout.max_new_tokens:
        raise ConfigError(f"algo.overlong_buffer={cfg.algo.overlong_buffer} is longer than rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens}")


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


def overlong_buffer(cfg: Config) -> int:
    """DAPO's L_cache: algo.overlong_buffer, or a fifth of max_new_tokens (DAPO: 4096 of 20480)."""
    return cfg.algo.overlong_buffer or max(1, cfg.rollout.max_new_tokens // 5)


def parse_override(text: str, typ: Any = None) -> tuple[str, Any]:
    """(dotted key, value). The value is YAML (numbers, lists, null), except for a key whose type
    `typ` is text: YAML read run.name=0123 as 83 and data.prompt_template=Q: {prompt} as a mapping,
    so text keys take the characters as typed; a quoted value is unquoted as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. algo.beta=0.01")
    key, raw = text.split("=", 1)
    if _is_text(typ) and not (len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""):
        return key.strip(), raw
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _is_text(typ: Any) -> bool:
    """str, or a Literal of strings (algo.aggregation)."""
    return typ is str or (typing.get_origin(typ) is Literal and all(isinstance(a, str) for a in typing.get_args(typ)))


def field_type(key: str) -> Any:
    """The annotation of a dotted config key ("run.name" -> str), or None for a key that is not
    a field (unknown keys, and keys inside a mapping such as reward.components.format)."""
    obj: Any = Config()
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def _nest(key: str, value: Any) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


class _UniqueKeys(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently,
    so a second `algo:` block would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); "
                    "merge the two", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- overrides, each value checked as it is applied."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.load(f, Loader=_UniqueKeys) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        _apply(cfg, data, "", path)
    for text in overrides:
        key, value = parse_override(text, field_type(text.split("=", 1)[0]))
        _apply(cfg, _nest(key, value), "", "command line")
    _validate(cfg)
    return cfg
