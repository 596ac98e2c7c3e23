"""Config checks that span sections (each section validates its own keys in sections.py):
raised as config errors that name every key involved, before anything starts."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .sections import fail, overlong_buffer

if TYPE_CHECKING:
    from .sections import Config


def across_sections(cfg: Config) -> None:
    _check_reference(cfg)
    _check_local_verifier(cfg)
    _check_model_and_batches(cfg)
    _check_sampler_logprobs(cfg)
    _check_lengths(cfg)
    _check_keep_best(cfg)
    _check_retention(cfg)
    _check_env(cfg)
    _check_tensor_parallel(cfg)


def _check_env(cfg: Config) -> None:
    env, rollout = cfg.env, cfg.rollout
    if env.turn_tokens > rollout.max_new_tokens:
        raise fail(f"env.turn_tokens={env.turn_tokens} is more than rollout.max_new_tokens={rollout.max_new_tokens}, "
                   "which bounds the whole trajectory after the prompt (every turn and observation)",
                   "env.turn_tokens", "rollout.max_new_tokens")
    if cfg.data.task == "multiply" and not env.name:
        raise fail("data.task='multiply' is the tool task (3-digit products the model cannot do in its head): set "
                   "env.name=python (configs/tool_default.yaml)", "data.task", "env.name")


def _check_keep_best(cfg: Config) -> None:
    metric = cfg.train.keep_best
    logged = [f"eval/pass@{k}" for k in cfg.eval.ks] + ["eval/mean_reward"]
    for s in cfg.eval.sets:
        logged += [f"eval/{s.name}/pass@{k}" for k in (s.ks or cfg.eval.ks)] + [f"eval/{s.name}/mean_reward"]
    if metric and metric not in logged:
        raise fail(f"train.keep_best={metric!r}: no evaluation logs it; the metrics are {', '.join(logged)} "
                   "(eval.ks sets the pass@k)", "train.keep_best", "eval.ks")


def _check_retention(cfg: Config) -> None:
    action = cfg.eval.retention_action
    if action != "warn" and not any(s.retention for s in cfg.eval.sets):
        raise fail(f"eval.retention_action={action} acts when a retention set falls, but no set in eval.sets is "
                   "marked retention: true; mark the capability to keep, e.g. eval.sets=[{name: keep, path: "
                   "keep.jsonl, retention: true}]", "eval.retention_action", "eval.sets")
    if action == "rollback" and not cfg.train.eval_every:
        raise fail("eval.retention_action=rollback goes back to a checkpoint saved while every retention set held, "
                   "known only from evaluations during the run, but train.eval_every=0 evaluates at the start and "
                   "the end alone; set train.eval_every", "eval.retention_action", "train.eval_every")
    if action == "rollback" and not cfg.train.checkpoint_every:
        raise fail("eval.retention_action=rollback goes back to a checkpoint saved while every retention set held, "
                   "but train.checkpoint_every=0 saves none before the end; set train.checkpoint_every (e.g. the "
                   "same as train.eval_every)", "eval.retention_action", "train.checkpoint_every")


def _check_local_verifier(cfg: Config) -> None:
    if cfg.reward.pool.mode == "local" and cfg.env.name:
        raise fail(f"reward.pool.mode=local with env.name={cfg.env.name!r}: an environment's tool calls run on the "
                   "Serve pool's sandboxed replicas; set reward.pool.mode=serve", "reward.pool.mode", "env.name")


def _check_reference(cfg: Config) -> None:
    algo = cfg.algo
    if cfg.lora and algo.ref_reset_every:
        raise fail(f"algo.ref_reset_every={algo.ref_reset_every} with model.lora.rank={cfg.model.lora.rank}: a LoRA "
                   "run's reference is its base with the adapter off, and a reset would have to fold the adapter "
                   "into the base; set algo.ref_reset_every=0 (or model.lora.rank=0 to train every weight)",
                   "algo.ref_reset_every", "model.lora.rank")
    if not cfg.needs_reference and (algo.ref_reset_every or algo.kl_action == "rollback"):
        key = "algo.ref_reset_every" if algo.ref_reset_every else "algo.kl_action"
        shown = f"algo.ref_reset_every={algo.ref_reset_every}" if algo.ref_reset_every else "algo.kl_action=rollback"
        raise fail(f"{shown} needs a reference policy, but algo.beta=0 with algo.kl_stop=null runs none; "
                   "set algo.kl_stop (e.g. 0.1) to keep the KL guard and its reference",
                   key, "algo.beta", "algo.kl_stop")
    res = cfg.resources
    if res.reference_host == "learner" and res.reference_gpus > 0:
        raise fail(f"resources.reference_host=learner runs the reference inside the learner ranks, on their devices, "
                   f"so resources.reference_gpus={res.reference_gpus} would be unused; set reference_gpus=0, or "
                   "reference_host=actor to give the reference a GPU of its own", "resources.reference_host",
                   "resources.reference_gpus")


def _check_model_and_batches(cfg: Config) -> None:
    if cfg.model.path == "builtin:tiny" and cfg.data.task not in ("arithmetic", "multiply"):
        raise fail("model.path='builtin:tiny' is warm-started on a built-in task; set data.task=arithmetic (or "
                   "multiply) or point model.path at a Hugging Face model folder", "model.path", "data.task")
    rows, parts = cfg.rollout.prompts_per_step * cfg.algo.group_size, cfg.algo.mini_batches * cfg.learner.num_ranks
    if rows % parts:
        raise fail(f"algo.mini_batches * learner.num_ranks = {parts} must divide rollout.prompts_per_step * "
                   f"algo.group_size = {rows} (every rank takes an equal share of every mini-batch)",
                   "algo.mini_batches", "learner.num_ranks", "rollout.prompts_per_step", "algo.group_size")
    if cfg.learner.num_ranks > 1 and 0 < cfg.resources.learner_gpus < 1:
        raise fail(f"resources.learner_gpus={cfg.resources.learner_gpus} with learner.num_ranks="
                   f"{cfg.learner.num_ranks}: two ranks could share one GPU, which NCCL refuses; use 1 "
                   "(or 0 on CPUs)", "resources.learner_gpus", "learner.num_ranks")


def _check_sampler_logprobs(cfg: Config) -> None:
    algo, rollout = cfg.algo, cfg.rollout
    if rollout.asynchronous and algo.recompute_old_logprobs and algo.tis == "none":
        raise fail("rollout.asynchronous=true with algo.recompute_old_logprobs=true needs algo.tis=token or "
                   "sequence: the recomputed old logprobs are the learner's, one update past the sampler, "
                   "and only the importance weights against the sampler's correct for that lag",
                   "rollout.asynchronous", "algo.recompute_old_logprobs", "algo.tis")
    if rollout.asynchronous and algo.dynamic_sampling:
        raise fail("rollout.asynchronous=true does not work with algo.dynamic_sampling=true yet (the extra "
                   "rounds would be sampled with other weights); turn one of them off",
                   "rollout.asynchronous", "algo.dynamic_sampling")
    if rollout.top_p < 1.0 and not algo.recompute_old_logprobs:
        raise fail(f"rollout.top_p={rollout.top_p} samples from the renormalised nucleus, so the sampler's "
                   "logprobs (old_logprobs) are not the full softmax the learner computes: the ratio would "
                   "start below 1 and the clip act on that gap. Set algo.recompute_old_logprobs=true "
                   "algo.tis=token (importance weights against the sampler), or rollout.top_p=1.0",
                   "rollout.top_p", "algo.recompute_old_logprobs")
    if algo.tis != "none" and not algo.recompute_old_logprobs:
        raise fail(f"algo.tis={algo.tis!r} needs algo.recompute_old_logprobs=true: the importance "
                   "weights compare the learner's old logprobs with the sampler's",
                   "algo.tis", "algo.recompute_old_logprobs")


def _check_lengths(cfg: Config) -> None:
    rollout = cfg.rollout
    if rollout.max_new_tokens >= rollout.max_model_len:
        raise fail(f"rollout.max_new_tokens={rollout.max_new_tokens} leaves no room for the prompt in "
                   f"rollout.max_model_len={rollout.max_model_len} (vLLM stops an answer there, so the "
                   "truncation metrics and overlong handling would be off): raise rollout.max_model_len "
                   "to the longest prompt plus max_new_tokens, or lower max_new_tokens",
                   "rollout.max_new_tokens", "rollout.max_model_len")
    if cfg.algo.overlong == "penalty" and overlong_buffer(cfg) > rollout.max_new_tokens:
        raise fail(f"algo.overlong_buffer={cfg.algo.overlong_buffer} is longer than rollout.max_new_tokens="
                   f"{rollout.max_new_tokens}", "algo.overlong_buffer", "rollout.max_new_tokens")


def _check_tensor_parallel(cfg: Config) -> None:
    tp, res = cfg.rollout.tensor_parallel, cfg.resources
    if cfg.model.path == "builtin:tiny" and cfg.model.num_heads % tp:
        raise fail(f"rollout.tensor_parallel={tp} does not divide model.num_heads={cfg.model.num_heads}: vLLM gives "
                   "each worker an equal share of the attention heads", "rollout.tensor_parallel", "model.num_heads")
    if tp > 1 and 0 < res.generator_gpus < 1:
        raise fail(f"resources.generator_gpus={res.generator_gpus} with rollout.tensor_parallel={tp}: each worker "
                   "of a sharded engine needs a GPU of its own; use 1 (or 0 on CPUs)",
                   "resources.generator_gpus", "rollout.tensor_parallel")
    if tp > 1 and res.generator_gpus and res.colocate == "all":
        raise fail(f"resources.colocate=all with rollout.tensor_parallel={tp}: a generator sharded over {tp} GPUs "
                   "cannot share one learner rank's GPU; use resources.colocate=learner_reference or none",
                   "resources.colocate", "rollout.tensor_parallel")
    if cfg.sync.method == "collective" and cfg.lora and cfg.model.lora.sync == "adapter":
        raise fail("sync.method=collective broadcasts whole weights; model.lora.sync=adapter sends the adapter's "
                   "files (a few MB) through the object store: use sync.method=object_store, or "
                   "model.lora.sync=merged", "sync.method", "model.lora.sync")
