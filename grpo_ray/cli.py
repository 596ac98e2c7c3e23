"""`grpo-ray` command line: train, build-model."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .data import DataError

DEFAULT_CONFIG = "configs/default.yaml"


def _train(args) -> None:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, address=args.address)


def _build_model(args) -> None:
    from .tasks import tokenizer_corpus
    from .tiny_model import TinyShape, build_tiny_model

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
    t.set_defaults(fn=_train)
    b = sub.add_parser("build-model", help="build a tiny random Qwen2 model + tokenizer offline")
    b.add_argument("out_dir")
    b.add_argument("--hidden-size", type=int, default=128)
    b.add_argument("--num-layers", type=int, default=2)
    b.add_argument("--num-heads", type=int, default=4)
    b.add_argument("--max-operand", type=int, default=49)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_build_model)
    args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:  # only overrides given
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    try:
        args.fn(args)
    except (ConfigError, DataError, OSError) as e:
        print(f"grpo-ray: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
