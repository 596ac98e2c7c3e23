"""One training run between start-up and shut-down (driver/train.py starts and stops it): the
step loop, and what happens between steps: evaluate, checkpoint, the guards (KL, retention,
non-finite steps, reward functions, weight-sync parity), rollback, the reference reset, and the
end of the run (final evaluation, final_model/, plots)."""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import ray

from ..config import Config, ConfigError
from ..core.metrics import Monitor
from ..data.datasets import PromptSampler
from ..roles.actors import Roles, replace_reference
from ..roles.startup import Timeline
from ..roles.waiting import Stalled
from .best import Best, write_best_model
from .checkpoint import (REFERENCES, checkpoint_path, discard_after, list_checkpoints, load_state, lora_state,
                         newest_good, prune, write_state, writing)
from .evaluation import EvalSet, Retention, RetentionStop, evaluate_sets
from .outputs import summary_line, write_samples
from .parity import PARITY, ParityStop, describe, threshold, verdict
from .rollout import InFlight
from .step import REWARD_ERRORS, RewardFunctionError, ref_reset_due, reward_error_messages, train_step
from .tracking import Tracker


def save_policy(roles: Roles, run_dir: str, name: str) -> str:
    """Policy in Hugging Face format (loadable by transformers and vLLM), written atomically to
    run_dir/name (name may be a/b: the temp folder is a/.b.tmp)."""
    final = os.path.join(run_dir, name)
    with writing(final) as tmp:
        roles.learners.save_policy(tmp)
    return final


@dataclass
class After:
    """What the loop does after a step's guards, evaluation and checkpoint (Run.between_steps)."""
    stop: bool = False  # the KL guard stopped the run (finish() saves the drifted policy flagged)
    back_to: int | None = None  # rolled back to the checkpoint of this step: the steps after it run again
    busy: bool = False  # evaluated, checkpointed or reset the reference: not step time


class NonFiniteStop(ConfigError):
    """train.max_nonfinite_steps steps in a row skipped optimizer steps on a non-finite loss or
    gradient: the run stops, in one line, naming the checkpoint to resume from."""


class Run:
    """What one training run carries between steps: the actors, the prompt sampler, the KL
    monitor and the metrics file; and what it does besides steps: evaluate and checkpoint."""

    def __init__(self, cfg: Config, roles: Roles, run_dir: str, model_path: str, sampler: PromptSampler,
                 eval_sets: list[EvalSet], log, reference: str, timeline: Timeline, metrics: Tracker):
        self.cfg, self.roles, self.run_dir, self.sampler, self.eval_sets, self.log = (
            cfg, roles, run_dir, sampler, eval_sets, log)
        self.retention = Retention(eval_sets, cfg.eval.retention_drop)  # eval.sets marked retention
        self.pass_keys = [s.pass_key for s in eval_sets]  # each set's, in the step line
        self.timeline = timeline  # start-up and shut-down phases (timings.json)
        self.model_path, self.reference = model_path, reference  # the reference actor's folder
        self.metrics = metrics
        self.pad_id = roles.fleet.pad_id()  # the padding of the batches built from rollouts
        self.monitor = Monitor(cfg.algo.kl_stop, cfg.algo.kl_window)
        self.plotting: Future | None = None  # the plots, drawn in a thread at the end
        self.best = Best(cfg.train.keep_best) if cfg.train.keep_best else None  # train.keep_best
        self.saved: int | None = None  # the step of the last checkpoint this session saved
        self.last_eval: dict = {}  # the newest evaluation's metrics
        self.evaluated: int | None = None  # the step of the newest evaluation
        self.lr_scale, self.rollbacks = 1.0, 0  # KL rollbacks so far and the lr factor they left
        self.ahead: InFlight | None = None  # rollout.asynchronous: the next step's rollout, sampling
        self.nonfinite_run: tuple[int, int] | None = None  # (first step, steps) in a row with skipped steps
        self.reward_errors_said: set[str] = set()  # reward components whose first failure was said
        self.parity_pushed: int | None = None  # the step after which the parity guard pushed the weights again

    def restore(self, path: str, state: dict) -> int:
        """Generators, sampler and monitor as they were at the checkpoint (the learners restored
        theirs in start_roles); returns the first step to run. The generators start from the base
        model and get the checkpoint's weights pushed: a Ray restart rebuilds an actor from its
        constructor's folder, and pruning may delete the checkpoint's (train.keep_checkpoints)."""
        self.roles.fleet.resync(version=state["step"])
        self.load_guards(state)
        self.lr_scale, self.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)
        self.log(f"resumed from {path}: step {state['step']} of {self.cfg.train.steps} done")
        self.metrics.write({"step": state["step"], "event": "resume", "message": path})
        return state["step"] + 1

    def load_guards(self, state: dict) -> None:
        """From a checkpoint's state (resume, rollback): the prompt sampler's position, the KL
        monitor, the best evaluation so far and the retention baselines."""
        self.sampler.load_state_dict(state["sampler"])
        self.monitor.load_state_dict(state["monitor"])
        if self.best:
            self.best.load_state_dict(state.get("best"))
        self.retention.load_state_dict(state.get("retention"))

    def loop(self, start: int, tqdm) -> None:
        cfg, steps, step, last = self.cfg, self.cfg.train.steps, start, start - 1
        if start == 1 and cfg.train.eval_at_start:
            with self.timeline.phase("first evaluation"):
                self.evaluate(0)
        # the bar is closed (its line ended) also on an error or a stop: the CLI's last line follows it
        with tqdm(desc="grpo", unit="step", file=sys.stderr, initial=start - 1, total=steps) as bar:
            mark = None  # when the last step returned: its bookkeeping below counts in the next step's time
            stopped = False  # by the KL guard
            while step <= steps:
                begun = time.time()
                try:
                    m, samples, self.ahead = train_step(step, cfg, self.roles, self.sampler,
                                                        self.pad_id, self.ahead, started=mark)
                except (ray.exceptions.RayActorError, Stalled) as e:  # a learner (no restarts), a role out of restarts
                    raise RuntimeError(self.died(step, e)) from None
                if step == start:
                    self.timeline.add("first step", begun, time.time())
                mark = time.perf_counter()
                self.record(step, m, samples)
                last = step
                after = self.between_steps(step, m)
                if after.stop:
                    stopped = True
                    break
                if after.back_to is not None:  # rolled back: the steps after that checkpoint run again
                    step, mark, bar.n = after.back_to + 1, None, after.back_to
                    continue
                if after.busy:  # evaluations and checkpoints are not step time
                    mark = None
                step += 1
                bar.update(1)
        self.finish(start, last, stopped)

    def record(self, step: int, m: dict, samples: list[dict]) -> None:
        """A step's metrics line, spot check and console line; the guards that act on one step:
        reward functions that failed, non-finite updates, weight-sync parity."""
        cfg = self.cfg
        errors, parity = m.pop(REWARD_ERRORS, {}), m.pop(PARITY, {})
        self.metrics.write(m)
        self.reward_errors(step, errors)  # raises RewardFunctionError when a component failed everywhere
        if cfg.train.spot_check_every and step % cfg.train.spot_check_every == 0:
            write_samples(self.run_dir, step, samples)
        if step % cfg.run.log_every == 0:  # with the newest evaluation's pass@ of every set
            self.log(summary_line(m, cfg.train.steps) + "".join(
                f" | {k[5:]} {self.last_eval[k]:.3f}" for k in self.pass_keys if k in self.last_eval))
        self.nonfinite(step, m)  # raises NonFiniteStop after train.max_nonfinite_steps in a row
        self.parity(step, parity)  # pushes the weights again; raises ParityStop when that did not help

    def between_steps(self, step: int, m: dict) -> After:
        """The KL guard, the reference reset, the evaluation (and its retention guard) and the
        checkpoint due after `step`, in that order."""
        cfg = self.cfg
        if self.watch(step, m):
            back = self.rollback(step, "KL guard", newest_good(self.run_dir)) if cfg.algo.kl_action == "rollback" \
                else None
            return After(stop=back is None, back_to=back)
        busy = False
        if ref_reset_due(cfg, step):  # after the KL check: a policy that drifted is no reference
            self.reset_reference(step)
            busy = True
        if self.evaluation_due(step):
            back = self.retention_guard(step, self.evaluate(step))  # raises RetentionStop
            if back is not None:
                return After(back_to=back)
            busy = True
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            self.checkpoint(step)
            busy = True
        return After(busy=busy)

    def evaluation_due(self, step: int) -> bool:
        """Every train.eval_every steps; the last step's is finish()'s, except with
        eval.retention_action=rollback, which may still go back from there."""
        cfg = self.cfg
        if step == cfg.train.steps:
            return cfg.eval.retention_action == "rollback" and bool(self.retention.keys)
        return bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0

    def retention_guard(self, step: int, fell: list[str]) -> int | None:
        """eval.retention_action stop or rollback, when a retention set fell at the evaluation of
        `step`: returns the step rolled back to, or stops the run with a checkpoint of `step`
        (RetentionStop, also when no rollback is left)."""
        if not fell:
            return None
        why = "eval.retention_action=stop"
        if self.cfg.eval.retention_action == "rollback":
            back = self.rollback(step, "retention guard", newest_good(self.run_dir, at_most=self.retention.held_at))
            if back is not None:
                return back
            if step == self.cfg.train.steps:  # as with stop, the last evaluation ends the run as usual (LOST)
                return None
            why = "eval.retention_action=rollback, and no rollback could be made"
        self.checkpoint(step)
        raise RetentionStop(f"{fell[0]} ({why}: checkpoint of step {step} saved in "
                            f"{checkpoint_path(self.run_dir, step)})")

    def reward_errors(self, step: int, errors: dict) -> None:
        """Each reward component's first failure, said at once (with where it failed); a
        component that failed on every completion of the step stops the run."""
        said, failed = reward_error_messages(step, errors, self.reward_errors_said)
        for msg in said:
            self.log(f"warning: {msg}")
            self.metrics.write({"step": step, "event": "warning", "message": msg})
        if failed:
            raise RewardFunctionError(failed)

    def finish(self, start: int, last: int, stopped: bool) -> None:
        """The end of a run: evaluate, checkpoint, final_model/, plots. Also when this session
        trained nothing but an earlier one was cut short after its last checkpoint."""
        cfg, final = self.cfg, os.path.join(self.run_dir, "final_model")
        if last < start and os.path.isdir(final):
            return
        phase = self.timeline.phase
        if self.evaluated != last:  # the loop evaluated the last step already (evaluation_due)
            with phase("final evaluation"):
                self.evaluate(last, final=True)
        if verdict := self.retention.verdict(self.last_eval):
            self.log(verdict)
            self.metrics.write({"step": last, "event": "retention_verdict", "message": verdict})
        if stopped:  # kept beside the last good one (checkpoint.prune), which a rollback goes back to
            self.checkpoint(last, kl_stopped=True)
            good = newest_good(self.run_dir)
            self.log(f"KL guard: checkpoint of step {last} saved as stopped; the newest saved while the KL rule "
                     f"held is {good[1] if good else 'none'}")
        elif last >= start and not (cfg.train.checkpoint_every and last % cfg.train.checkpoint_every == 0):
            with phase("final checkpoint"):
                self.checkpoint(last)
        with phase("final model"):
            self.log(f"final policy: {save_policy(self.roles, self.run_dir, 'final_model')}")
            if cfg.lora:  # final_model/ is merged; the adapter alone, for PEFT and vLLM's LoRA serving
                with writing(os.path.join(self.run_dir, "final_adapter")) as tmp:
                    self.roles.learners.save_adapter(tmp)
                self.log(f"final adapter: {os.path.join(self.run_dir, 'final_adapter')}")
            if self.best and self.best.step is not None:
                self.log(f"best policy: {write_best_model(self.run_dir, self.best)} (step {self.best.step}, "
                         f"{self.best.metric} {self.best.value:.3f})")
        if cfg.run.plots:  # drawn while the actors stop (plotted())
            pool = ThreadPoolExecutor(1)
            self.plotting = pool.submit(self._plot)
            pool.shutdown(wait=False)

    def _plot(self) -> None:
        from .report import plots_and_report

        plots_and_report(self.run_dir, self.cfg.algo.kl_stop, self.log, self.timeline)

    def plotted(self) -> None:
        """Wait for the plots (_plot turns a failure into a warning)."""
        if self.plotting is not None:
            self.plotting.result()

    def reset_reference(self, step: int) -> None:
        """algo.ref_reset_every (DeepSeek-R1: every 400 steps): the reference becomes the current
        policy. It is saved to reference_policy/step_N (one folder per reset, so a checkpoint names
        the reference it had: a resume or a rollback loads that one) and the reference actor is
        started from there, so a crash restart of that actor loads the reset policy too."""
        self.use_reference(save_policy(self.roles, self.run_dir,
                                       os.path.join(REFERENCES, f"step_{step:06d}")))
        self.metrics.write({"step": step, "event": "ref_reset", "message": f"reference := policy of step {step}"})

    def use_reference(self, path: str) -> None:
        """The reference from the model folder `path` (its actor restarted, or the learner ranks'
        copies reloaded: called when no learner call runs)."""
        replace_reference(self.roles, self.cfg, path)
        self.reference = path

    def died(self, step: int, e: Exception) -> str:
        found = list_checkpoints(self.run_dir)
        where = (f"the last checkpoint is step {found[-1][0]} ({found[-1][1]}): run the same command with --resume"
                 if found else "there is no checkpoint yet (train.checkpoint_every): the run has to start over")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if isinstance(e, Stalled):
            return f"at step {step}, {first}; stopping; {where}"
        return f"an actor died at step {step} and could not be restarted ({first}); {where}"

    def rollback(self, step: int, guard: str, good: tuple[int, str] | None) -> int | None:
        """Back to the checkpoint `good` (the KL guard: the newest saved while the KL rule held; the
        retention guard: the newest up to the last evaluation at which every retention set held):
        policy, optimizer, sampler, monitor and reference, with the learning rate times
        algo.kl_rollback_lr_factor per rollback (algo.kl_max_rollbacks in all, both guards
        together); returns its step, or None to stop."""
        a = self.cfg.algo
        if self.rollbacks >= a.kl_max_rollbacks or not good:
            why = "no checkpoint to roll back to" if not good else f"algo.kl_max_rollbacks={a.kl_max_rollbacks} used"
            self.log(f"{guard}: stopping instead of rolling back ({why})")
            return None
        path = good[1]
        state = load_state(path)
        if self.ahead is not None:  # before a reference reload, which would wait behind its pass
            self.ahead.drop_reference()
        discard_after(self.run_dir, state["step"])  # the abandoned steps' checkpoints and reference resets
        self.rollbacks += 1
        scale = a.kl_rollback_lr_factor ** self.rollbacks
        self.roles.learners.load_state(os.path.join(path, "learner"))  # awaits every rank's calls before it
        if (state.get("reference") or self.model_path) != self.reference:
            self.use_reference(state.get("reference") or self.model_path)
        lr = self.roles.learners.scale_lr(scale / state.get("lr_scale", 1.0))
        self.lr_scale = scale
        self.ahead = None  # sampled by the rolled-back policy
        self.roles.fleet.resync(version=state["step"])
        self.load_guards(state)
        self.saved = self.evaluated = self.nonfinite_run = None  # the steps after it run again
        self.last_eval = {}  # its newest evaluation was of the abandoned policy
        if guard.startswith("retention"):  # the target is retention-good: protected, the next fall's target
            self.retention.held_at = max(self.retention.held_at or 0, state["step"])
        # saved again with the rollback counted and the lower lr: a crash in the rerun resumes from
        # here, not from a state that would refund the rollback and repeat the fall
        self.checkpoint(state["step"])
        msg = (f"{guard}: rolled back from step {step} to the checkpoint of step {state['step']} ({path}); "
               f"learning rate now {lr:.3g} (x{scale:g}), rollback {self.rollbacks} of {a.kl_max_rollbacks}")
        self.log(msg)
        event = "kl_rollback" if guard.startswith("KL") else "retention_rollback"
        self.metrics.write({"step": step, "event": event, "message": msg, "to_step": state["step"]})
        return state["step"]

    def watch(self, step: int, m: dict) -> bool:
        """The guide's thresholds: warnings when they start; True when the KL rule fires (then
        the run stops, or rolls back with algo.kl_action=rollback)."""
        warnings, stop = self.monitor.check(m)
        for w in warnings:
            self.log(f"warning: {w}")
            self.metrics.write({"step": step, "event": "warning", "message": w})
        if stop:
            action = "rolling back" if self.cfg.algo.kl_action == "rollback" else "stopping"
            self.log(f"KL guard at step {step}: {stop}; {action}")
            self.metrics.write({"step": step, "event": "kl_stop", "message": stop})
        return stop is not None

    def nonfinite(self, step: int, m: dict) -> None:
        """A step whose update skipped optimizer steps on a non-finite loss or gradient (the learner
        left the weights as they were): a warning and a `nonfinite` event. After
        train.max_nonfinite_steps such steps in a row the run stops without saving its weights
        (NonFiniteStop), naming the newest checkpoint from before the first of them."""
        skipped = int(m.get("nonfinite_steps", 0))
        if not skipped:
            self.nonfinite_run = None
            return
        first, n = (self.nonfinite_run[0], self.nonfinite_run[1] + 1) if self.nonfinite_run else (step, 1)
        self.nonfinite_run, limit = (first, n), self.cfg.train.max_nonfinite_steps
        total = skipped + int(m.get("optimizer_steps", 0))
        msg = (f"step {step}: {skipped} of {total} optimizer steps skipped on a non-finite loss or gradient (the "
               f"weights stay as they were; {n} such step(s) in a row, the run stops at train.max_nonfinite_steps="
               f"{limit}): lower learner.lr, check the rewards and advantages for inf/NaN, or train in float32 "
               f"instead of bfloat16 (model.dtype)")
        self.log(f"warning: {msg}")
        self.metrics.write({"step": step, "event": "nonfinite", "message": msg, "nonfinite_steps": skipped})
        if n >= limit:
            before = [c for c in list_checkpoints(self.run_dir) if c[0] < first]
            where = (f"the last checkpoint before them is step {before[-1][0]} ({before[-1][1]}): resume from it "
                     "with a lower learner.lr" if before else
                     "there is no checkpoint from before them: start over with a lower learner.lr")
            raise NonFiniteStop(f"stopped after {n} steps in a row with a non-finite loss or gradient (steps "
                                f"{first}-{step}); the weights were not saved; {where}")

    def parity(self, step: int, by_generator: dict) -> None:
        """The weight-sync parity guard (driver/parity.py): a generator whose samples disagree with
        the learner beyond algo.sampler_kl_max gets the learner's current weights pushed again
        (every generator does), and the next step samples with them (a rollout sampling ahead is
        dropped, its prompts drawn again). This step has already trained on its samples: its
        old_logprobs were the sampler's, and the ratio's clipping bounds one step's damage. The
        same at the next step stops the run (ParityStop), naming the generator."""
        limit = threshold(self.cfg)
        above, stop = verdict(by_generator, limit, self.parity_pushed == step - 1)
        if not above:
            self.parity_pushed = None
            return
        who = describe(above, self.roles.fleet.names, by_generator)
        if stop:
            msg = (f"weight-sync parity: at step {step} {who} > algo.sampler_kl_max {limit:g}, again after the "
                   f"weights were pushed again at step {step - 1}: that generator is not sampling from the "
                   "learner's policy; check the weight sync (model.dtype, a partial weight load, a generator "
                   "started on another model)")
            self.metrics.write({"step": step, "event": "parity_stop", "message": msg})
            raise ParityStop(msg)
        msg = (f"weight-sync parity: at step {step} {who} > algo.sampler_kl_max {limit:g} (the sampler and the "
               "learner disagree on the same tokens); pushing the learner's weights to every generator again")
        self.log(f"warning: {msg}")
        self.metrics.write({"step": step, "event": "parity", "message": msg,
                            "generators": {self.roles.fleet.names[g]: kl for g, kl in above.items()}})
        if self.ahead is not None:  # sampled with the weights in doubt: drawn and sampled again
            self.ahead.drop_reference()
            self.sampler.load_state_dict(self.ahead.sampler_state)
            self.ahead = None
        self.roles.fleet.resync()
        self.parity_pushed = step

    def evaluate(self, step: int, final: bool = False) -> list[str]:
        """Every eval set, logged; the KL monitor's and the retention guard's warnings; a new best
        checkpoint (train.keep_best). Returns the retention warnings the loop must act on
        (eval.retention_action stop or rollback; none at the final evaluation)."""
        c, roles = self.cfg, self.roles
        roles.fleet.settle()  # evaluate the weights of `step`, loaded
        try:  # a generator Ray restarted mid-evaluation gets the current weights pushed (the fleet's resync)
            m = evaluate_sets(roles.fleet, roles.verifier, self.eval_sets, c.rollout.max_new_tokens, roles.env)
        except (ray.exceptions.RayActorError, Stalled) as e:
            raise RuntimeError(self.died(step, e)) from None
        self.metrics.write({"step": step, **m})
        self.log(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in m.items()))
        for w in self.monitor.check_eval(m[self.pass_keys[0]]):  # the main held-out set's
            self.log(f"warning: {w}")
            self.metrics.write({"step": step, "event": "warning", "message": w})
        fell = self.retention.check(m, step)
        for w in fell:
            self.log(f"warning: {w}")
            self.metrics.write({"step": step, "event": "retention", "message": w})
        self.evaluated, self.last_eval = step, m
        if fell and not final and c.eval.retention_action != "warn":
            return fell  # the loop stops or rolls back (retention_guard): this policy is no best one
        if self.best and self.best.offer(step, m):  # saved now: the next checkpoint may be steps away
            if step == self.saved:  # the loop saved this step before its evaluation: update its record
                path = checkpoint_path(self.run_dir, step)
                write_state(path, step, {**load_state(path), "best": self.best.state_dict()})
                prune(self.run_dir, c.train.keep_checkpoints, self.protected())
            else:
                self.checkpoint(step)
        return []

    def protected(self) -> tuple[int, ...]:
        """Checkpoints pruning keeps beside the newest: train.keep_best's, and the one a retention
        rollback would go back to."""
        steps = (self.best.step,) if self.best and self.best.step is not None else ()
        if self.cfg.eval.retention_action == "rollback" and self.retention.held_at is not None:
            good = newest_good(self.run_dir, at_most=self.retention.held_at)
            steps += (good[0],) if good else ()
        return steps

    def checkpoint(self, step: int, kl_stopped: bool = False) -> None:
        if step == self.saved and not kl_stopped:  # saved already (a new best was, at its evaluation)
            return
        # a rollout sampling ahead is not saved: a resume draws its prompts again
        sampler = self.ahead.sampler_state if self.ahead else self.sampler.state_dict()
        state = {"sampler": sampler, "monitor": self.monitor.state_dict(), "lora": lora_state(self.cfg),
                 "best": self.best.state_dict() if self.best else None, "retention": self.retention.state_dict(),
                 "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                 "reference": None if self.reference == self.model_path else self.reference,
                 "kl_stopped": kl_stopped}
        path = checkpoint_path(self.run_dir, step)
        with writing(path) as tmp:  # the same step saved again (a KL stop right after a save) replaces it
            self.roles.learners.checkpoint_into(tmp)
            write_state(tmp, step, state)
        prune(self.run_dir, self.cfg.train.keep_checkpoints, self.protected())
        self.saved = step
        self.metrics.write({"step": step, "event": "checkpoint", "message": path})
