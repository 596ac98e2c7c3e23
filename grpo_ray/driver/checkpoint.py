"""Checkpoints and resume.

Only the disk layout lives here; the learner group writes its parts (LearnerGroup.checkpoint_into).

Layout: <run_dir>/checkpoints/step_000010/
    policy/      the policy in Hugging Face format (transformers and vLLM load it as is)
    learner/     the training backend's state: weights, AdamW moments, LR schedule (every rank's shard)
    state.json   step, prompt-sampler position, KL-monitor window, the LR scale and rollbacks of
                 algo.kl_action=rollback, the reference's folder; written last

A checkpoint is written to `.step_000010.tmp` and renamed into place, so a crash mid-save leaves
the previous checkpoint as the newest valid one; the last `train.keep_checkpoints` are kept, and
the newest saved while the KL rule held (a KL stop saves one flagged `kl_stopped`). On resume the
learner restores learner/ and the generators get its weights, the reference is the one the
checkpoint names (the initial model, or reference_policy/step_N after an algo.ref_reset_every
reset), and the sampler draws the prompts the interrupted run would have drawn: there is no
other randomness in the driver, and sampling seeds derive from the step number. In sync mode
that makes the resumed run the uninterrupted one. In asynchronous mode the first step after a
resume samples with the checkpoint's weights, where the uninterrupted run sampled it one update
behind (the rollout in flight is not saved): same prompts and seeds, another trajectory.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil

STATE_VERSION = 1
REFERENCES = "reference_policy"  # algo.ref_reset_every: reference_policy/step_N, one per reset
_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    pass


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _NAME.match(name))]
    return sorted(found)


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(run_dir), f"step_{step:06d}")


class DiskFullError(OSError):
    """A save that ran out of disk: says which folder, that the disk is full, and that what was
    saved before is intact (the save went to a temp folder, removed again)."""


@contextlib.contextmanager
def writing(final: str):
    """A folder to fill, at a temp path beside `final` (.<name>.tmp, which list_checkpoints never
    returns and remove_partial_saves clears), renamed into place when the block ends without an
    error: a crash mid-save leaves the previous folder as it was. A full disk becomes a
    DiskFullError (torch's own message was `[enforce fail at inline_container.cc] unexpected pos`,
    naming no file)."""
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except Exception as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(final)).free
        raise DiskFullError(errno.ENOSPC, f"could not write {final}: the disk is full ({free / 2**20:.1f} MiB free); "
                            "nothing saved before was touched (the save went to a temp folder, now removed): "
                            "free some space or move run.output_dir, then run the same command with --resume",
                            final) from None
    replace_dir(tmp, final)


def disk_full(error: BaseException) -> bool:
    """Whether `error` (raised here, or in an actor: Ray wraps it, its text keeps the cause's)
    came from a full disk."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(seen) for s in ("No space left on device", "Disk quota exceeded", "unexpected pos")):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return False


def write_state(folder: str, step: int, state: dict) -> None:
    """state.json of a checkpoint (written last into its temp folder; into a saved checkpoint,
    through a temp file and a rename)."""
    path = os.path.join(folder, "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"version": STATE_VERSION, "step": step, **state}, f, indent=1)
    os.replace(path + ".tmp", path)


def replace_dir(new: str, final: str) -> None:
    """Put the folder `new` at `final`. An existing `final` is moved aside first and deleted
    last, so a crash in between leaves it whole (as `<new>.old`) instead of half-deleted."""
    old = new + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def kl_stopped(path: str) -> bool:
    """Saved when the KL guard stopped the run: its policy is the one that drifted."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            return bool(json.load(f).get("kl_stopped"))
    except (OSError, ValueError):
        return False


def newest_good(run_dir: str, at_most: int | None = None) -> tuple[int, str] | None:
    """The newest checkpoint saved while the KL rule held (what a KL rollback goes back to); with
    `at_most`, the newest of those up to that step (a retention rollback: up to the last
    evaluation at which every retention set held)."""
    good = [c for c in list_checkpoints(run_dir) if not kl_stopped(c[1]) and (at_most is None or c[0] <= at_most)]
    return good[-1] if good else None


def prune(run_dir: str, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Keep the newest `keep` checkpoints, and the newest one saved while the KL rule held even
    when it is older: the checkpoint of a KL stop must not push out the last good one; and the
    checkpoints of the steps in `protect` (train.keep_best's, a retention rollback's target).
    Then drop the reset references (reference_policy/step_N) that no kept checkpoint names,
    except the newest (the one the reference actor runs, and reloads if Ray restarts it)."""
    found = list_checkpoints(run_dir)
    kept = found[-keep:] + [c for c in found if not kl_stopped(c[1])][-1:] + [c for c in found if c[0] in protect]
    for c in found:
        if c not in kept:
            shutil.rmtree(c[1], ignore_errors=True)
    root = os.path.join(run_dir, REFERENCES)
    resets = sorted(name for name in os.listdir(root) if _NAME.match(name)) if os.path.isdir(root) else []
    named = set()
    for _, path in kept:
        try:
            named.add(os.path.normpath(load_state(path).get("reference") or ""))
        except CheckpointError:
            continue
    for name in resets[:-1]:
        if os.path.normpath(os.path.join(root, name)) not in named:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def discard_after(run_dir: str, step: int) -> None:
    """A rollback to the checkpoint of `step`: the checkpoints and reference resets of the steps
    after it belong to the run that was abandoned. Left on disk they would be what pruning keeps
    (pushing out the rerun's own), what a later rollback or a resume picks, and a reference no
    checkpoint of the rerun names."""
    for found, path in list_checkpoints(run_dir):
        if found > step:
            shutil.rmtree(path, ignore_errors=True)
    root = os.path.join(run_dir, REFERENCES)
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if (m := _NAME.match(name)) and int(m.group(1)) > step:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def remove_partial_saves(run_dir: str) -> None:
    """A save that crashed mid-write leaves its temp folder (.step_N.tmp); list_checkpoints
    never returns it, so it would only take disk space for good."""
    for root in (checkpoints_dir(run_dir), os.path.join(run_dir, REFERENCES)):
        if os.path.isdir(root):
            for name in os.listdir(root):
                if name.startswith(".step_") and name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_state(path: str) -> dict:
    """state.json of a checkpoint, checked; errors name the path and what is wrong."""
    state_file = os.path.join(path, "state.json")
    for need in (state_file, os.path.join(path, "policy", "config.json"), os.path.join(path, "learner")):
        if not os.path.exists(need):
            raise CheckpointError(f"checkpoint {path} is incomplete: {need} is missing; delete the directory "
                                  f"to resume from the one before")
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {state_file} is unreadable ({e}); delete {path} to resume from "
                              f"the one before") from None
    missing = [k for k in ("version", "step", "sampler", "monitor") if k not in state]
    if missing or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"checkpoint {state_file}: missing {missing} or version {state.get('version')!r} "
                              f"!= {STATE_VERSION}")
    return state


def check_shape(path: str, base_model: str) -> None:
    """The checkpoint's policy must have the base model's architecture (a checkpoint of another
    model in this run dir would load garbage or fail deep inside DeepSpeed)."""
    def shape(folder):
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
        return {k: c.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "vocab_size")}

    mine, base = shape(os.path.join(path, "policy")), shape(base_model)
    if mine != base:
        diff = {k: (mine[k], base[k]) for k in mine if mine[k] != base[k]}
        raise CheckpointError(f"checkpoint {path} is of a different model than {base_model}: "
                              f"{', '.join(f'{k} {a} != {b}' for k, (a, b) in diff.items())}")


def check_resume_mode(run_dir: str, mode: str) -> None:
    """run.resume's refusals, checked before the run writes anything (config.yaml included)."""
    found = list_checkpoints(run_dir)
    if mode == "never" and found:
        raise CheckpointError(f"run directory {run_dir} already has checkpoints (last: step {found[-1][0]}); "
                              f"set run.resume=auto to continue it, or choose another run.name")
    if mode == "must" and not found:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoints_dir(run_dir)}")


def lora_state(cfg) -> dict | None:
    """The model.lora keys a checkpoint's learner state depends on (sync does not); None: full
    fine-tuning."""
    return cfg.model.lora.model_dump(exclude={"sync"}) if cfg.lora else None


def find_resume(run_dir: str, mode: str, base_model: str, lora: dict | None = None) -> tuple[str, dict] | None:
    """(checkpoint path, state) to resume from, or None for a fresh run. mode: run.resume.
    lora: model.lora's keys that shape the learner's state (None: full fine-tuning); a
    checkpoint saved with others is refused here, before any actor starts."""
    check_resume_mode(run_dir, mode)
    found = list_checkpoints(run_dir)
    if mode == "never" or not found:
        return None
    path = found[-1][1]
    state = load_state(path)
    check_shape(path, base_model)
    saved = state.get("lora")
    if saved != lora:
        def said(x):
            return "full fine-tuning" if not x else ", ".join(f"model.lora.{k}={v}" for k, v in x.items())
        raise CheckpointError(f"checkpoint {path} was saved with {said(saved)}; this run has {said(lora)}; resume "
                              "with the same model.lora settings, or start another run (run.name)")
    return path, state
