"""The config tree as pydantic models: one model per section, each field with its type, bounds
and description (the JSON Schema of `grpo-ray config schema` comes from here), validators per
section, and the checks that span sections on Config. Defaults follow the DeepSeek-R1 recipe
(arXiv:2501.12948)."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..core.algorithm import AGGREGATIONS, ESTIMATORS, TIS_LEVELS
from .env import EnvConfig
from .fields import Float, Section, Text, _f, fail
from .resources import cpu_list


class RunConfig(Section):
    """Where the run writes, and how it is logged."""
    name: Text = _f("default", "the run directory's name under output_dir (one folder name)")
    output_dir: Text = _f("runs", "relative paths resolve against the cwd (under `ray job submit`: ~/grpo-ray)")
    seed: int = _f(0, "seed of sampling, data order and initialisation")
    log_every: int = _f(1, "print metrics every N steps", ge=1)
    resume: Literal["auto", "must", "never"] = _f(
        "auto", "auto: continue from the run dir's last checkpoint if any; must: fail without one; never: start over")
    tensorboard: bool = _f(True, "event files in <run dir>/tensorboard")
    wandb_project: Text = _f("", "Weights & Biases project; empty = off (needs `pip install wandb`)")
    plots: bool = _f(True, "PNG charts in <run dir>/plots at the end (also: grpo-ray plot RUN_DIR)")
    ray_dashboard: bool = _f(False, "start Ray's dashboard when the driver starts its own local Ray (a second "
                             "and a process more; it goes with the run); a running cluster keeps its own")
    stall_timeout_s: Optional[Float] = _f(
        1800.0, "the longest a remote call (sampling, a weight load, the reference pass, an update, a save) may go "
        "without progress before its role is named as stalled: a generator or a reference actor is restarted and "
        "the phase redone, a stalled learner (or the reference inside it: resources.reference_host) stops the run "
        "with the last checkpoint named; a restarted engine "
        "gets its start-up time on top; null = wait forever", gt=0.0)

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise fail(f"run.name={name!r}: expected one folder name (the run directory is "
                       f"run.output_dir/run.name), e.g. gsm8k-lr1e-6", "run.name")
        return name


# every linear layer of the attention and MLP blocks (Qwen2/Llama/Mistral names): LoRA on all of
# them comes much closer to full fine-tuning than on attention alone (Dettmers et al. 2023,
# QLoRA; Schulman et al. 2025, "LoRA Without Regret")
LORA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelLoraConfig(Section):
    """LoRA (Hu et al. 2021) through PEFT: the learner trains a low-rank adapter and the base stays
    frozen; the base with the adapter off is the KL reference (no reference actor runs)."""
    rank: int = _f(0, "adapter rank r; 0 = off (full fine-tuning)", ge=0)
    alpha: Float = _f(16.0, "the adapter's output is scaled by alpha / rank", gt=0.0)
    dropout: Float = _f(0.0, "dropout on the adapter's input in the learner only (the sampler has none, so "
                        "anything above 0 moves the ratio off 1 before any update)", ge=0.0, le=0.9)
    target_modules: list[Text] = _f(LORA_ALL_LINEAR, "the linear layers (by name) that get an adapter")
    sync: Literal["merged", "adapter"] = _f(
        "merged", "what the generators get after each update: merged, the base weights with the adapter folded "
        "in (vLLM runs no LoRA kernels); adapter, only the adapter's tensors (vLLM serves it as a LoRA)")

    @model_validator(mode="after")
    def _servable(self) -> ModelLoraConfig:
        if not self.target_modules:
            raise fail("model.lora.target_modules=[]: name at least one linear layer (default: all 7 of the "
                       "attention and MLP blocks)", "model.lora.target_modules")
        if heads := [t for t in self.target_modules if t in ("lm_head", "embed_tokens")]:
            raise fail(f"model.lora.target_modules: {heads}: adapters on the embeddings or the LM head are not "
                       "synced (vLLM ties and serves those whole); keep to the blocks' linear layers",
                       "model.lora.target_modules")
        if self.sync == "adapter" and self.rank > 512:
            raise fail(f"model.lora.rank={self.rank} with model.lora.sync=adapter: vLLM serves adapters up to "
                       "rank 512; use sync=merged", "model.lora.rank", "model.lora.sync")
        return self


class ModelConfig(Section):
    """The policy model."""
    path: Text = _f("builtin:tiny", "a Hugging Face model folder, or builtin:tiny (built and warm-started locally)")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "weights and compute dtype")
    share_prompts: bool = _f(True, "run each prompt once per group in the reference and learner passes "
                                   "(its KV cache serves the group's completions); false: every row whole")
    hidden_size: int = _f(128, "builtin:tiny only", ge=32)
    num_layers: int = _f(2, "builtin:tiny only", ge=1)
    num_heads: int = _f(4, "builtin:tiny only", ge=1)
    lora: ModelLoraConfig = Field(default_factory=ModelLoraConfig, description=ModelLoraConfig.__doc__)


class WarmStartConfig(Section):
    """Supervised warm start of builtin:tiny: GRPO needs a base model that is sometimes right."""
    steps: int = _f(1500, "SFT steps", ge=0)
    batch_size: int = _f(64, "SFT examples per step", ge=1)
    lr: Float = _f(3e-3, "SFT learning rate", gt=0.0)
    show_work: Float = _f(0.3, "fraction of SFT examples that show their work", ge=0.0, le=1.0)
    label_noise: Float = _f(0.9, "fraction of hasty SFT answers that are random guesses", ge=0.0, le=1.0)
    subtract: Float = _f(0.0, "share of each SFT batch that teaches subtraction, work always shown (' 48-37=11 #### "
                              "11'): a skill the base has and GRPO on additions does not train, checked by a "
                              "retention set (eval.sets: {task: subtract, retention: true}); arithmetic only",
                         ge=0.0, le=0.9)


class DataConfig(Section):
    """The prompts: the built-in tasks (arithmetic; multiply, with a Python tool), or your own JSONL files."""
    task: Literal["arithmetic", "multiply", "jsonl"] = _f(
        "arithmetic", "arithmetic or multiply (built in; multiply is the tool task: with env.name=python) or jsonl "
                      "(data.train_path)")
    train_path: Text = _f("", "jsonl only: a .jsonl file with prompt and answer fields")
    eval_path: Text = _f("", "jsonl only: held-out prompts; empty = eval_fraction of the training file")
    prompt_key: Text = _f("prompt", "the prompt's field in a JSONL row")
    answer_key: Text = _f("answer", "the answer's field in a JSONL row")
    prompt_template: Text = _f("{prompt}", "what the generators see; {prompt} is the row's prompt, e.g. "
                                           "'{prompt}\\nPut the final answer after ####.'")
    verifier: Text = _f("math", "scores rows without a `task` field: math, code, or module:function")
    max_operand: int = _f(49, "arithmetic only: largest operand", ge=1)
    eval_fraction: Float = _f(0.1, "share of the prompts held out for evaluation", gt=0.0, le=0.9)
    drop_long_prompts: bool = _f(False, "jsonl only: drop the rows whose prompt does not fit rollout.max_model_len - "
                                        "rollout.max_new_tokens tokens (counted), instead of stopping at the first")

    @field_validator("prompt_template")
    @classmethod
    def _has_prompt(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise fail(f"data.prompt_template={template!r} has no {{prompt}}: the row's prompt would not reach "
                       "the model", "data.prompt_template")
        return template

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, name: str) -> str:
        from ..verifiers.registry import builtin_names

        names = builtin_names()
        if name not in names and ":" not in name:
            raise fail(f"data.verifier={name!r}: expected {', '.join(names)}, or module:function", "data.verifier")
        return name

    @model_validator(mode="after")
    def _jsonl_has_file(self) -> DataConfig:
        if self.task == "jsonl" and not self.train_path:
            raise fail("data.task='jsonl' needs data.train_path (a .jsonl file with prompt and answer fields)",
                       "data.task", "data.train_path")
        return self


class AlgoConfig(Section):
    """The GRPO objective and its variants (docs/algorithms.md)."""
    group_size: int = _f(16, "completions per prompt (DeepSeek-R1: 16)", ge=2)
    epsilon: Float = _f(10.0, "clip range (DeepSeek-R1: 10; PPO: 0.2)", gt=0.0)
    epsilon_high: Optional[Float] = _f(None, "upper clip; null = epsilon", gt=0.0)
    beta: Float = _f(0.001, "k3 KL coefficient in the loss", ge=0.0)
    kl_stop: Optional[Float] = _f(0.1, "stop when the KL (median of the last kl_window steps) exceeds this; null = "
                                       "no KL guard (with beta 0: no reference actor, no reference pass)", gt=0.0)
    kl_window: int = _f(5, "steps in the KL stop rule's median; 1 = stop on any single step", ge=1)
    kl_action: Literal["stop", "rollback"] = _f("stop", "rollback: last checkpoint, lower lr, go on")
    kl_rollback_lr_factor: Float = _f(0.5, "lr multiplier per rollback", gt=0.0, le=1.0)
    kl_max_rollbacks: int = _f(2, "then the run stops", ge=0)
    estimator: Literal[ESTIMATORS] = _f("grpo", "advantage estimator: grpo, dr_grpo (no std scaling), "
                                                "rloo (leave-one-out)")
    aggregation: Literal[AGGREGATIONS] = _f("seq_mean", "token aggregation: seq_mean (DeepSeekMath), "
                                                        "token_mean (DAPO), constant (Dr. GRPO)")
    clip_ratio_c: Optional[Float] = _f(None, "dual clip for A < 0; null = off", gt=1.0)
    ref_reset_every: int = _f(0, "reset the reference to the current policy every N steps "
                                 "(DeepSeek-R1: 400); 0 = never", ge=0)
    ppo_epochs: int = _f(1, "passes over each rollout (mu in DeepSeekMath)", ge=1)
    mini_batches: int = _f(1, "optimizer steps per pass; DeepSeek-R1 splits a rollout into 16", ge=1)
    dynamic_sampling: bool = _f(False, "DAPO: drop groups with equal rewards, refill with new prompts")
    dynamic_sampling_rounds: int = _f(3, "extra generation rounds to refill the batch", ge=0)
    overlong: Literal["none", "mask", "penalty"] = _f(
        "none", "truncated completions: train on them (none), mask them, or DAPO's soft penalty")
    overlong_buffer: Optional[int] = _f(None, "DAPO L_cache in tokens; null = max_new_tokens // 5", ge=1)
    overlong_penalty_factor: Float = _f(1.0, "DAPO's penalty at max_new_tokens", ge=0.0)
    recompute_old_logprobs: bool = _f(False, "learner recomputes old logprobs (the sampler's kept for TIS)")
    tis: Literal[("none", *TIS_LEVELS)] = _f("none", "truncated importance sampling vs the sampler")
    tis_cap: Float = _f(2.0, "truncation C of the importance weights", ge=1.0)
    entropy_coef: Float = _f(0.0, "entropy bonus in the loss; 0 = off (entropy is logged anyway)", ge=0.0)
    sampler_kl_max: Optional[Float] = _f(
        None, "weight-sync parity guard: a generator whose sampler_kl (its samples' token mean of vLLM's logprob "
              "minus the learner's) exceeds this gets the weights pushed again; again at the next step: the run "
              "stops naming it. null = by model.dtype, far above what the dtype explains: 1e-3 for float32 "
              "(measured ~1e-8), 1e-2 for bfloat16 (at most 5e-3 a token measured); off with rollout.asynchronous, whose samples lag "
              "one update (a number applies there too; a large one, e.g. 1e9, turns the guard off)", gt=0.0)


class MathRewardConfig(Section):
    """The math verifier."""
    extraction: Literal["boxed", "marked", "any"] = _f(
        "any", "boxed: \\boxed{} only; marked: \\boxed{} or ####; any: also the last number")
    timeout_s: Float = _f(5.0, "math-verify time limit per comparison", gt=0.0)


class CodeRewardConfig(Section):
    """The code verifier (sandboxed test runs)."""
    timeout_s: Float = _f(2.0, "wall clock per check; a record's timeout_s wins", gt=0.0)
    memory_mb: int = _f(512, "address-space limit of the sandboxed program", ge=64)
    partial_credit: bool = _f(False, "reward = fraction of assertions that hold, instead of all-or-nothing")
    allow_unsandboxed: bool = _f(False, "without a working bubblewrap (user namespaces allowed) code checks refuse "
                                        "to run; true runs them with rlimits and uid 65534 only: NOT isolated "
                                        "(network, world-readable files)")
    warm_sandbox: bool = _f(True, "each check in a fork of a warm sandbox (README); false: a fresh sandbox each")


class UserRewardConfig(Section):
    """User reward functions ('module:function', as a row's task or a reward component)."""
    timeout_s: Float = _f(10.0, "time limit per call: a call past it is stopped (its worker process killed) and "
                                "scores 0 with 'timeout after N s', counted in reward/<name>/errors; the pool's "
                                "request budget bounds it too", gt=0.0)


class VerifierPoolConfig(Section):
    """The Ray Serve deployment that scores completions (autoscaling_config comes from here)."""
    mode: Literal["serve", "local"] = _f(
        "serve", "serve: an autoscaling Ray Serve deployment (replicas on `verifier` nodes, restarted and resent "
                 "to when they die); local: the same verifiers in the driver's process on max_ongoing_requests "
                 "threads, for quick runs on one machine (no Serve to start: ~5 CPU-s of a 2-core start-up; no "
                 "autoscaling; user reward functions still run in worker processes of their own); not with env.name")
    min_replicas: int = _f(1, "fewest verifier replicas", ge=1)
    max_replicas: int = _f(4, "most verifier replicas", ge=1)
    target_ongoing_requests: Float = _f(2.0, "per replica; more in flight scales up", gt=0.0)
    max_ongoing_requests: int = _f(4, "requests one replica works on at once (threads)", ge=1)
    upscale_delay_s: Float = _f(2.0, "autoscaler delay before adding replicas", ge=0.0)
    downscale_delay_s: Float = _f(20.0, "autoscaler delay before removing replicas", ge=0.0)
    chunk_size: int = _f(0, "completions per request; 0 = auto: about target_request_s of work each", ge=0)
    target_request_s: Float = _f(0.25, "work per request when chunk_size is 0", gt=0.0)
    request_timeout_s: Float = _f(120.0, "a request still unanswered is sent again; a replica stops its math "
                                         "comparisons in time to answer", gt=0.0)
    max_retries: int = _f(3, "resends of a request whose replica died or timed out", ge=0)
    replica_cpus: Float = _f(0.1, "CPUs per replica", ge=0.0)
    verifier_resource: Float = _f(1.0, "custom resource 'verifier' per replica, when the cluster has one", ge=0.0)
    verifier_nodes: Literal["auto", "require", "none"] = _f(
        "auto", "auto: replicas need `verifier` when the cluster has some when the run starts; require: always "
                "(an autoscaler that starts verifier nodes from zero only adds them for a pending demand); "
                "none: never (replicas go wherever CPUs are free)")

    @model_validator(mode="after")
    def _replica_range(self) -> VerifierPoolConfig:
        if self.max_replicas < self.min_replicas:
            raise fail(f"reward.pool.max_replicas={self.max_replicas} is below reward.pool.min_replicas="
                       f"{self.min_replicas}; raise max_replicas or lower min_replicas",
                       "reward.pool.max_replicas", "reward.pool.min_replicas")
        return self


class RewardConfig(Section):
    """The reward: a weighted sum of components, and the verifiers' options."""
    components: dict[str, Float] = _f({"correct": 1.0}, "weighted sum of reward components: correct (the task's "
                                                        "verifier), format (<think>/<answer>), or module:function; "
                                                        "merged into the default; a weight of 0 turns one off")
    math: MathRewardConfig = Field(default_factory=MathRewardConfig, description="the math verifier")
    code: CodeRewardConfig = Field(default_factory=CodeRewardConfig, description="the code verifier")
    user: UserRewardConfig = Field(default_factory=UserRewardConfig, description="user reward functions")
    pool: VerifierPoolConfig = Field(default_factory=VerifierPoolConfig, description="the verifier pool")

    @field_validator("components")
    @classmethod
    def _known_components(cls, weights: dict) -> dict:
        from ..verifiers import check_components

        if not weights:
            raise fail("reward.components is empty; e.g. {correct: 1.0}", "reward.components")
        try:
            check_components(weights)
        except ValueError as e:
            named = [n for n in weights if repr(n) in str(e) or f".{n}=" in str(e)]
            raise fail(str(e), *(f"reward.components.{n}" for n in named[:1] or weights)) from None
        return weights


class RolloutConfig(Section):
    """Sampling the completions (vLLM generators)."""
    prompts_per_step: int = _f(16, "prompts per training step", ge=1)
    temperature: Float = _f(1.0, "sampling temperature", gt=0.0)
    top_p: Float = _f(1.0, "nucleus sampling; below 1 needs algo.recompute_old_logprobs", gt=0.0, le=1.0)
    max_new_tokens: int = _f(16, "longest completion in tokens", ge=1)
    num_generators: int = _f(1, "vLLM generator actors", ge=1)
    max_model_len: int = _f(512, "prompt plus completion, in tokens", ge=16)
    kv_cache_mb: int = _f(256, "vLLM's KV cache per generator (per worker with tensor_parallel), in MiB", ge=16)
    # on the CPU, vLLM compiles the model with inductor: measured here (2026-11-26, one process,
    # alternating), sampling 8 x 16 answers took 0.16 -> 0.14 s (tiny) and 5.7 -> 5.5 s (small, 128
    # tokens), for 0-6 s more start-up per engine with a warm compile cache (~/.cache/vllm), 28-37 s
    # without: worth it on long CPU runs, not on the 20-step default job.
    enforce_eager: bool = _f(True, "true: vLLM runs the model eagerly; false: CUDA graphs on GPUs (faster "
                                   "decoding), inductor on CPUs (worth it on long runs only)")
    asynchronous: bool = _f(False, "one step off-policy: step n+1's rollout is sampled while step n trains")
    tensor_parallel: int = _f(1, "vLLM tensor parallelism: each generator's model is sharded over this many "
                                 "workers on one node, each with resources.generator_gpus (or its own CPU cores)",
                              ge=1)


class LearnerConfig(Section):
    """The policy update (DeepSpeed learner ranks)."""
    lr: Float = _f(1e-4, "learning rate", gt=0.0)
    warmup_steps: int = _f(5, "linear learning-rate warm-up, in optimizer steps", ge=0)
    weight_decay: Float = _f(0.0, "AdamW weight decay", ge=0.0)
    grad_clip: Float = _f(1.0, "gradient norm clip", ge=0.0)
    micro_batch_size: int = _f(64, "rows per forward/backward pass", ge=1)
    backend: str = _f("deepspeed", "training backend: a name registered in grpo_ray/roles/backends/__init__.py "
                                   "(BACKENDS; checked when the roles start)")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage", ge=0, le=3)
    num_ranks: int = _f(1, "learner ranks (data parallel)", ge=1)


class TrainConfig(Section):
    """The training loop."""
    steps: int = _f(60, "training steps", ge=0)
    eval_every: int = _f(20, "0 = only at start and end", ge=0)
    eval_at_start: bool = _f(True, "evaluate the base before step 1 (the baseline of every eval chart); false: "
                             "the first evaluation is at eval_every or the end, for quick runs")
    checkpoint_every: int = _f(50, "0 = only at the end", ge=0)
    keep_checkpoints: int = _f(2, "newest checkpoints kept; older ones are deleted", ge=1)
    keep_best: Text = _f("", "an eval metric (e.g. eval/pass@1): the checkpoint of the best evaluation after a step "
                         "is saved and kept beside the newest ones, and copied to best_model/ at the end; empty = off")
    spot_check_every: int = _f(10, "write samples/step_N.{jsonl,md} every N steps; 0 = never", ge=0)
    spot_check_samples: int = _f(8, "completions per spot check", ge=1)
    max_nonfinite_steps: int = _f(3, "stop after this many steps in a row whose update skipped an optimizer step "
                                     "on a non-finite loss or gradient (the weights stay as they were; the "
                                     "newest checkpoint before them is named for the resume)", ge=1)


class EvalSetConfig(Section):
    """One more evaluation set beside the main held-out one: its metrics are eval/<name>/pass@k
    and eval/<name>/mean_reward; unset keys take the eval section's values."""
    name: Text = _f("", "a folder-safe name (its metrics: eval/<name>/...)")
    path: Text = _f("", "a JSONL file of prompts (data.prompt_key, answer_key, prompt_template and verifier "
                        "apply; a row may name its own task)")
    task: Literal["", "subtract"] = _f("", "instead of path, a built-in set: subtract (held-out subtractions up to "
                                           "data.max_operand; builtin:tiny learns them with warmstart.subtract)")
    num_prompts: Optional[int] = _f(None, "default: eval.num_prompts", ge=1)
    samples: Optional[int] = _f(None, "default: eval.samples", ge=1)
    ks: Optional[list[Annotated[int, Field(ge=1)]]] = _f(None, "default: eval.ks")
    temperature: Optional[Float] = _f(None, "default: eval.temperature", gt=0.0)
    retention: bool = _f(False, "a capability the run must keep (the GRPO guide's best practice 4): a warning "
                                "and a `retention` event when its pass@ (smallest k) falls more than "
                                "eval.retention_drop below its first evaluation")

    @model_validator(mode="after")
    def _named(self) -> EvalSetConfig:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise fail(f"eval.sets: name={self.name!r}: give each set a folder-safe name", "eval.sets")
        if self.name == "held-out":  # the main set's name in grpo-ray eval's folders and the retention lines
            raise fail("eval.sets: name='held-out' is the main held-out set's; give this set another name", "eval.sets")
        if bool(self.path) == bool(self.task):
            raise fail(f"eval.sets: set {self.name!r} needs a path (a JSONL file of prompts) or a task (a built-in "
                       "set: subtract), one of the two", "eval.sets")
        return self


class EvalConfig(Section):
    """Evaluation on held-out prompts (pass@k)."""
    num_prompts: int = _f(64, "held-out prompts per evaluation", ge=1)
    samples: int = _f(16, "completions per prompt for unbiased pass@k", ge=1)
    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 10], min_length=1,
                                                  description="the k of pass@k, each >= 1 and <= samples")
    temperature: Float = _f(1.0, "sampling temperature", gt=0.0)
    sets: list[EvalSetConfig] = _f([], "more evaluation sets beside the held-out one (e.g. a capability to keep)")
    retention_drop: Float = _f(0.05, "how far (absolute) a retention set's pass@ may fall below its first value "
                                     "before the warning", ge=0.0, le=1.0)
    retention_action: Literal["warn", "stop", "rollback"] = _f(
        "warn", "when a retention set falls: warn (and go on); stop the run with a checkpoint of that step; or "
                "roll back to the newest checkpoint saved while every retention set held, with the learning rate "
                "times algo.kl_rollback_lr_factor (the KL guard's rollback: algo.kl_max_rollbacks in all)")

    @model_validator(mode="after")
    def _enough_samples(self) -> EvalConfig:
        if max(self.ks) > self.samples:
            raise fail(f"eval.ks={self.ks!r} needs eval.samples >= {max(self.ks)} (pass@k is estimated from "
                       f"`samples` completions), got {self.samples}", "eval.ks", "eval.samples")
        names = [s.name for s in self.sets]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise fail(f"eval.sets: the name(s) {dupes} are given twice; each set needs its own", "eval.sets")
        for s in self.sets:
            ks, samples = s.ks or self.ks, s.samples or self.samples
            if max(ks) > samples:
                raise fail(f"eval.sets: set {s.name!r}: ks={ks!r} needs samples >= {max(ks)}, got {samples}",
                           "eval.sets")
        return self


class ResourcesConfig(Section):
    """What each role instance asks Ray for. The roles are reserved together in one placement
    group (grpo_ray/roles/placement.py): a bundle per learner rank, generator and the reference, or
    shared bundles when co-located. Fractional CPUs by default: on 2 cores, whole-CPU requests
    can starve other actors into a hang. On GPU nodes: 1 GPU per learner rank and generator."""
    generator_cpus: Float = _f(0.25, "CPUs per vLLM generator (per worker with rollout.tensor_parallel)", gt=0.0)
    learner_cpus: Float = _f(0.25, "CPUs per learner rank", gt=0.0)
    reference_cpus: Float = _f(0.25, "CPUs of the reference", gt=0.0)
    generator_gpus: Float = _f(0.0, "GPUs per vLLM generator, per worker with rollout.tensor_parallel (one engine "
                                    "per GPU at most)", ge=0.0, le=1.0)
    learner_gpus: Float = _f(0.0, "GPUs per learner rank (DeepSpeed: one device per rank)", ge=0.0, le=1.0)
    reference_gpus: Float = _f(0.0, "GPUs of the reference", ge=0.0, le=1.0)
    colocate: Literal["none", "learner_reference", "all"] = _f(
        "none", "none: a bundle per actor; learner_reference: the reference shares learner rank 0's bundle; "
                "all: generators and the reference share the learner ranks' bundles (and their GPUs)")
    reference_host: Literal["auto", "actor", "learner"] = _f(
        "auto", "where the frozen reference runs. actor: an actor of its own (its bundle: reference_cpus, "
                "reference_gpus); learner: inside the learner ranks' processes, each rank scoring a share of the "
                "rows with a copy of the reference in its memory (one process fewer to start, no device of its "
                "own; not restarted on a stall, as the ranks are not); auto: learner when neither the learner "
                "ranks nor the reference have a GPU, else actor")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", "Ray placement-group strategy over the bundles: PACK fills few nodes, SPREAD keeps them apart")
    placement_timeout_s: Float = _f(120.0, "how long to wait for the cluster (or its autoscaler) to fit every role",
                                    gt=0.0)
    torch_threads: int = _f(0, "intra-op threads of the learner and reference; 0 = auto (see cpu_threads)", ge=0)
    actor_restarts: int = _f(3, "restarts of a crashed generator or reference actor (learners: none; resume "
                                "from a checkpoint instead)", ge=0)
    vllm_cpu_threads: Text = _f("auto", "CPU ids for vLLM's CPU backend, like 0-3,8; auto: see cpu_threads")

    @field_validator("vllm_cpu_threads")
    @classmethod
    def _cpu_ids(cls, spec: str) -> str:
        try:
            if spec != "auto" and not cpu_list(spec):
                raise ValueError("no CPU ids")
        except ValueError:
            raise fail(f"resources.vllm_cpu_threads={spec!r}: expected CPU ids like '0-1' or '0-3,8', or auto",
                       "resources.vllm_cpu_threads") from None
        return spec


class SyncConfig(Section):
    """How the learner's new weights reach the generators after each update."""
    method: Literal["object_store", "collective"] = _f(
        "object_store", "object_store: rank 0's buckets go through Ray's object store to each generator; collective: "
                        "rank 0 broadcasts them to every generator worker in one process group (NCCL on GPUs, gloo "
                        "on CPUs; roles/collective.py)")
    timeout_s: Float = _f(120.0, "collective: a sync (or the group's forming) that takes longer fails, naming the "
                                 "generators it waited for", gt=0.0)


class Config(Section):
    """The whole config tree: configs/*.yaml, then dotted command-line overrides."""
    run: RunConfig = Field(default_factory=RunConfig, description=RunConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    warmstart: WarmStartConfig = Field(default_factory=WarmStartConfig, description=WarmStartConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description=AlgoConfig.__doc__)
    reward: RewardConfig = Field(default_factory=RewardConfig, description=RewardConfig.__doc__)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description=RolloutConfig.__doc__)
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description=LearnerConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    eval: EvalConfig = Field(default_factory=EvalConfig, description=EvalConfig.__doc__)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description=ResourcesConfig.__doc__)
    env: EnvConfig = Field(default_factory=EnvConfig, description=EnvConfig.__doc__)
    sync: SyncConfig = Field(default_factory=SyncConfig, description=SyncConfig.__doc__)

    @property
    def needs_reference(self) -> bool:
        """Whether anything needs the frozen reference: the KL term (beta > 0) or the KL guard. With
        beta 0 and kl_stop null (DAPO, Dr. GRPO) there is none: TRL and verl skip theirs the same
        way, which saves a forward pass over every rollout and a model's memory."""
        return self.algo.beta > 0 or self.algo.kl_stop is not None

    @property
    def uses_reference(self) -> bool:
        """Whether a frozen reference model runs (an actor, or a copy in the learner ranks:
        reference_actor). A LoRA run's reference is its own base with the adapter off, computed in
        the learner (as TRL does), so no second copy of the model is loaded."""
        return self.needs_reference and not self.model.lora.rank

    @property
    def reference_actor(self) -> bool:
        """Whether the reference runs in an actor of its own, else in the learner ranks
        (resources.reference_host). On CPUs there is no device to keep apart, and its own process
        cost ~5 CPU-s of a 2-core box's start-up (benchmarks/RESULTS.md)."""
        res = self.resources
        host = res.reference_host
        if host == "auto":
            host = "learner" if res.learner_gpus == 0 and res.reference_gpus == 0 else "actor"
        return self.uses_reference and host == "actor"

    @property
    def reference_in_learners(self) -> bool:
        """Whether each learner rank hosts a copy of the reference (resources.reference_host)."""
        return self.uses_reference and not self.reference_actor

    @property
    def lora(self) -> bool:
        return self.model.lora.rank > 0

    @property
    def epsilon_high(self) -> float:
        return self.algo.epsilon if self.algo.epsilon_high is None else self.algo.epsilon_high

    def to_dict(self) -> dict:
        return self.model_dump()

    @model_validator(mode="after")
    def _across_sections(self) -> Config:
        """Checks that span sections (each section checks its own keys; these are in checks.py)."""
        from .checks import across_sections

        across_sections(self)
        return self


def overlong_buffer(cfg: Config) -> int:
    """DAPO's L_cache: algo.overlong_buffer, or a fifth of max_new_tokens (DAPO: 4096 of 20480)."""
    return cfg.algo.overlong_buffer or max(1, cfg.rollout.max_new_tokens // 5)
