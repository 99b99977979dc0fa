"""The ``progtuning`` command: parses arguments and dispatches, nothing else.

    progtuning train CONFIG.yaml [--key value ...]   one experiment → OUTPUT_DIR/results.json
    progtuning plan --model M --epochs T              parts, stages and updated parameters
    progtuning models [fetch NAME]                    the offline model aliases

A user's mistake is printed as one line, ``error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ProgtuningError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    rest: list[str] = []
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # `train [CONFIG] --any-config-key value ...`: the keys come from TrainConfig, not argparse,
        # which would take an override's value for the positional CONFIG.
        has_config = len(argv) > 1 and not argv[1].startswith("--")
        args = parser.parse_args(argv[: 2 if has_config else 1])
        rest = argv[2 if has_config else 1 :]
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args, rest) or 0
    except ProgtuningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from .config import config_help

    parser = argparse.ArgumentParser(prog="progtuning", description="Progressive fine-tuning for Transformers.")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser(
        "train",
        help="run one experiment from a YAML config plus --key value overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML or --key value; booleans: --flag / --no-flag):\n" + config_help(),
    )
    train.add_argument("config", nargs="?", help="YAML config (its first line is the command that runs it)")
    train.set_defaults(handler=_train)

    plan = commands.add_parser("plan", help="show parts, stages and updated parameters before training")
    plan.add_argument("--model", default="minilm-l6", help="alias, folder with config.json, or hub id")
    plan.add_argument("--epochs", type=int, default=3, help="epochs of the run (and stages T by default)")
    plan.add_argument("--stages", type=int, help="number of parts/stages T (default: epochs)")
    plan.add_argument("--embeddings", default="always", help="always | first_stage | never")
    plan.add_argument("--unit", default="epoch", help="epoch | fraction")
    plan.add_argument("--method", default="full", help="full | lora | adapter | bitfit")
    plan.add_argument("--num-labels", type=int, default=2)
    plan.add_argument("--blocks", help="dotted path of the block list, for unknown layouts")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plan.set_defaults(handler=_plan)

    models = commands.add_parser("models", help="list the offline model aliases, or fetch one (mpnet-base)")
    models.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    models.add_argument("name", nargs="?")
    models.set_defaults(handler=_models)
    return parser


def _train(args, rest: list[str]) -> int:
    from .config import load_config, parse_overrides
    from .train import run
    from .report import print_run_summary

    config = load_config(args.config, parse_overrides(rest))
    results = run(config)
    print_run_summary(results)
    return 0


def _plan(args, rest: list[str]) -> int:
    from .plan import build_plan, render_plan

    plan = build_plan(
        args.model,
        epochs=args.epochs,
        stages=args.stages,
        embeddings=args.embeddings,
        unit=args.unit,
        method=args.method,
        num_labels=args.num_labels,
        blocks=args.blocks,
    )
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        render_plan(plan)
    return 0


def _models(args, rest: list[str]) -> int:
    from .models import MODEL_ALIASES, fetch_model

    if args.action == "fetch":
        if not args.name:
            raise ProgtuningError("models fetch needs a name, e.g. `progtuning models fetch mpnet-base`")
        print(fetch_model(args.name))
        return 0
    for name, description in MODEL_ALIASES.items():
        print(f"{name:<14} {description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
