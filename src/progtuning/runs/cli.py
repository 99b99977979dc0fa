"""The ``progtuning`` command: parses arguments and dispatches, nothing else.

    progtuning train CONFIG.yaml [--key value ...]   one experiment → OUTPUT_DIR/results.json
    progtuning plan --model M --epochs T              parts, stages and updated parameters
    progtuning models [fetch NAME]                    the offline model aliases
    progtuning bench [--hidden 384 --layers 12 ...]   time and memory of each stage vs full fine-tuning
    progtuning sweep SWEEP.yaml [--parallel N]        a resumable grid of train runs, one folder each
    progtuning report DIR... [--out DIR]              Markdown/CSV tables and PNG plots from results.json files
    progtuning probe CONFIG.yaml [--key value ...]    train embeddings + one block, for each block (Figure 1)
    progtuning predict RUN_DIR --file new.csv         a saved run's predictions (with probabilities) for a file
    progtuning evaluate RUN_DIR --file labelled.csv   a saved run scored on a labelled file with the task's metric
    progtuning push RUN_DIR [--hub-model-id ID]       a finished run to the Hugging Face hub (model, card, results)
    progtuning --version

A user's mistake is printed as one line, ``error: ...``, with exit code 2: a bad value or an unknown
option (with the closest known one), a missing file, an output folder that cannot be used, a
full disk, a missing optional package (with the extra that installs it, :data:`EXTRAS`). ``train``
checks its whole config before it imports torch, so such a line comes within about a second.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys

from progtuning.core.presets import DEFAULT_PRESET, PRESETS, get_preset
from progtuning.errors import ProgtuningError
from progtuning.methods.config import METHOD_HEADS
from progtuning.methods.registry import METHODS

# Optional packages -> the pyproject extra that installs them (the core needs only torch + transformers).
EXTRAS = {
    "peft": "peft",
    "rich": "cli",
    "datasets": "train",
    "pandas": "train",
    "sklearn": "train",
    "scipy": "train",
    "matplotlib": "report",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "gguf": "gguf",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv[:1])
    rest: list[str] = []
    try:
        if argv[:1] in (["train"], ["probe"]) and not {"-h", "--help"} & set(argv):
            # `train|probe [CONFIG] [own options] --any-config-key value ...`: the keys come from
            # TrainConfig, not argparse, which would take an override's value for the positional CONFIG.
            own, rest = _split_own_options(argv[1:], _PROBE_OPTIONS if argv[0] == "probe" else {})
            args = parser.parse_args([argv[0], *own])
        else:
            args = parser.parse_args(argv)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    from progtuning.runs.reporting import show_progress_lines

    show_progress_lines()  # stage switches and other progress lines on stderr
    try:
        return args.handler(args, rest) or 0
    except OSError as error:
        from progtuning.runs.output_dir import io_error, is_io_fault

        if not is_io_fault(error):
            raise
        print(f"error: {io_error(error, 'cannot read or write a file')}", file=sys.stderr)
        return 2
    except ProgtuningError as error:
        exit_code = getattr(error, "exit_code", None)  # a clean stop on SIGTERM / Ctrl-C (stops.TrainingStopped)
        if exit_code is not None:
            from progtuning.core.distributed import launcher_rank

            if launcher_rank() == 0:  # several processes: say it once
                print(error.message(_resume_command(argv)), file=sys.stderr)
            return exit_code
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        print(f"error: {package} is not installed: pip install 'progtuning[{EXTRAS[package]}]' (or `make setup`)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _resume_command(argv: list[str]) -> str:
    """The command line that continues a stopped run: the same one, without --overwrite, plus --resume."""
    words = [a for a in argv if a not in ("--overwrite", "--no-resume")]
    if "--resume" not in words:
        words.append("--resume")
    return " ".join(shlex.quote(w) for w in ["progtuning", *words])


class _UsageError(Exception):
    """A command line argparse cannot parse; :func:`main` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the closest known option or command (no usage block)."""

    def error(self, message: str):
        from progtuning.runs.validation import did_you_mean

        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if unknown:
            flag = unknown.group(1).split("=", 1)[0]
            options = [o for a in self._command_actions() for o in a.option_strings if o.startswith("--")]
            message = f"unknown key {flag}{did_you_mean(flag, options)}"
        elif choice:
            names = [c.strip(" '") for c in choice.group(2).split(",")]
            message = f"unknown choice {choice.group(1)!r}{did_you_mean(choice.group(1), names)}: use one of " \
                      f"{', '.join(names)}"
        raise _UsageError(f"{message}: see `{self._help_command()} --help`")

    def _command_actions(self) -> list[argparse.Action]:
        chosen = getattr(self, "chosen", None)
        return list(chosen._actions) if chosen is not None else list(self._actions)

    def _help_command(self) -> str:
        chosen = getattr(self, "chosen", None)
        return chosen.prog if chosen is not None else self.prog


def _parser(command: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` (``argv[:1]``) says which subcommand's options must be complete."""
    from progtuning.runs.config import config_help

    from progtuning import __version__

    parser = _Parser(prog="progtuning", description="Progressive fine-tuning for Transformers.")
    parser.add_argument("--version", action="version", version=f"progtuning {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

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
    plan.add_argument("--preset", choices=list(PRESETS), help=f"the settings the paper leaves open (default {DEFAULT_PRESET})")
    plan.add_argument("--embeddings", help="always | first_stage | never (default: the preset's)")
    plan.add_argument("--unit", default="epoch", help="epoch | fraction")
    plan.add_argument("--method", default="full", choices=list(METHODS), help="fine-tuning method (its default settings)")
    plan.add_argument("--method-head", default="classifier", choices=list(METHOD_HEADS),
                      help="the part of the head a PEFT method trains (full fine-tuning trains everything)")
    plan.add_argument("--num-labels", type=int, default=2)
    plan.add_argument("--blocks", help="dotted path of the block list, for unknown layouts")
    plan.add_argument("--schedule", default="fixed", help="fixed | contribution (then only the bounds are known)")
    plan.add_argument("--target-reduction", type=float, help="contribution: fraction of updated parameters to save")
    plan.add_argument("--decision-interval", type=float, default=0.1, help="contribution: fraction of steps between decisions")
    plan.add_argument("--contribution-threshold", type=float, help="contribution: readiness threshold (default 0.3)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plan.set_defaults(handler=_plan)

    models = commands.add_parser("models", help="list the offline model aliases, or fetch one (mpnet-base)")
    models.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    models.add_argument("name", nargs="?")
    models.set_defaults(handler=_models)

    from progtuning.runs.bench_config import add_arguments as add_bench_arguments  # torch-free

    bench = commands.add_parser("bench", help="step time and peak memory: full fine-tuning vs each Progtuning stage")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)

    sweep = commands.add_parser("sweep", help="run a grid of experiments (resumable; see configs/sweep/)")
    sweep.add_argument("config", help="sweep YAML: base, grid, variants, per-task/method/model overrides")
    sweep.add_argument("--parallel", type=int, help="runs at once (default: the YAML's parallel, else 1)")
    sweep.add_argument("--output-dir", help="sweep folder (default: the YAML's output_dir)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; run nothing")
    sweep.add_argument("--only", action="append", metavar="PATTERN",
                       help="only the runs whose name matches, e.g. 'bbc-news/*/prog-matched/seed1'; repeatable")
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser("report", help="tables and plots from results.json files (never trains)")
    report.add_argument("dirs", nargs="+", help="sweep folders, run folders or results.json files")
    report.add_argument("--out", default="runs/report", help="folder for results.md, results.csv, runs.csv and PNGs")
    report.add_argument("--markdown", help="write the Markdown here instead (only between report markers if present)")
    report.add_argument("--split", default="test", choices=["test", "validation"], help="which split's score")
    report.add_argument("--title", default="Progtuning sweep results")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples of the paired bootstrap over seeds x examples (0: no intervals)")
    report.add_argument("--compare", action="append", default=[], metavar="ARM:OTHER",
                        help="also compare two arms head to head, paired by seed (e.g. prog-contrib:prog-fast); "
                             "repeatable")
    report.add_argument("--tasks", help="only these tasks, comma-separated (e.g. rotten-tomatoes,trec6)")
    report.add_argument("--arms", help="only these arms, comma-separated (e.g. base,prog,prog-fast); "
                                       "each keeps the baseline it is compared with")
    report.set_defaults(handler=_report)

    probe = commands.add_parser(
        "probe",
        help="per-block contribution: embeddings + one block + head, each block in turn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="any other --key value is a train config override (see `progtuning train --help`)",
    )
    probe.add_argument("config", nargs="?", help="train YAML giving task, model, method and budget")
    for option, (metavar, text) in _PROBE_OPTIONS.items():
        if metavar:
            probe.add_argument(option, metavar=metavar, help=text)
        else:
            probe.add_argument(option, action="store_true", help=text)
    probe.set_defaults(handler=_probe)
    _add_reuse_commands(commands)
    parser.chosen = commands.choices.get(command[0]) if command else None  # whose options an error lists
    return parser


def _add_reuse_commands(commands) -> None:
    """predict, evaluate and push: what is done with a finished run."""
    predict = commands.add_parser("predict", help="predictions of a saved run for a CSV/TSV/JSONL file")
    predict.add_argument("run_dir", help="the output folder of `progtuning train`")
    predict.add_argument("--file", required=True, help="rows to predict, with the columns the run was trained on")
    predict.add_argument("--out", help="where to write them (default: beside the file, NAME.predictions.EXT)")
    predict.add_argument("--batch-size", type=int, help="prediction batch size (default: the run's eval_batch_size)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser("evaluate", help="score a saved run on a labelled file with its task's metric")
    evaluate.add_argument("run_dir", help="the output folder of `progtuning train`")
    evaluate.add_argument("--file", required=True, help="labelled rows (CSV/TSV/JSONL), columns as in training")
    evaluate.add_argument("--batch-size", type=int, help="batch size (default: the run's eval_batch_size)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=_evaluate)

    push = commands.add_parser("push", help="upload a finished run to the Hugging Face hub (model, card, results)")
    push.add_argument("run_dir", help="the output folder of `progtuning train`")
    push.add_argument("--hub-model-id", help="repository (default: the folder's name)")
    push.add_argument("--hub-private", action="store_true", help="create the repository private")
    push.set_defaults(handler=_push)


def _predict(args, rest: list[str]) -> int:
    from progtuning.runs.predict import predict_file

    out, rows = predict_file(args.run_dir, args.file, args.out, batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"{rows} predictions -> {out}")
    return 0


def _evaluate(args, rest: list[str]) -> int:
    from progtuning.runs.predict import evaluate_file

    result = evaluate_file(args.run_dir, args.file, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['task']} on {result['file']} ({result['examples']} examples):")
    for name, value in result["scores"].items():
        marker = "  (main metric)" if name == result["main_metric"] else ""
        print(f"  {name:<24} {value:.4f}{marker}" if isinstance(value, float) else f"  {name:<24} {value}")
    return 0


def _push(args, rest: list[str]) -> int:
    from progtuning.runs.hub import check_can_push, push_run

    check_can_push()
    print(push_run(args.run_dir, args.hub_model_id, private=args.hub_private))
    return 0


# probe's own options (everything else on its command line is a train override): option -> (metavar, help)
_PROBE_OPTIONS = {
    "--blocks": ("I,J,...", "block indices to probe (default: all)"),
    "--seeds": ("S,T,...", "seeds (default: the config's seed)"),
    "--parallel": ("N", "runs at once (default 1)"),
    "--out": ("DIR", "probe folder (default: runs/probe/<task>/<model>-<method>)"),
    "--no-full": (None, "skip the all-blocks reference run"),
}


def _split_own_options(tokens: list[str], options: dict) -> tuple[list[str], list[str]]:
    """Split ``[CONFIG] tokens`` into the command's own arguments and TrainConfig overrides."""
    own, rest, i = [], [], 0
    if tokens and not tokens[0].startswith("--"):
        own, i = [tokens[0]], 1
    while i < len(tokens):
        name = tokens[i].split("=", 1)[0]
        takes = 1 if name in options and options[name][0] and "=" not in tokens[i] else 0
        (own if name in options else rest).extend(tokens[i : i + 1 + takes])
        i += 1 + takes
    return own, rest


def _train(args, rest: list[str]) -> int:
    from progtuning.runs.config import load_config, parse_overrides
    from progtuning.runs.validation import preflight

    config = load_config(args.config, parse_overrides(rest))
    checked = preflight(config)  # files, output folder, model, resume: still without torch
    from progtuning.core.distributed import launcher_rank
    from progtuning.runs.summary import print_run_summary
    from progtuning.runs.train import run

    results = run(config, checked)
    if launcher_rank() == 0:  # several processes (torchrun): one summary
        print_run_summary(results)
    return 0


def _plan(args, rest: list[str]) -> int:
    from progtuning.runs.plan import build_plan, render_plan

    plan = build_plan(
        args.model,
        epochs=args.epochs,
        stages=args.stages,
        embeddings=get_preset(args.preset).under(embeddings=args.embeddings)["embeddings"],
        unit=args.unit,
        method=args.method,
        method_head=args.method_head,
        num_labels=args.num_labels,
        blocks=args.blocks,
        schedule=args.schedule,
        target_reduction=args.target_reduction,
        decision_interval=args.decision_interval,
        contribution_threshold=args.contribution_threshold,
    )
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        render_plan(plan)
    return 0


def _models(args, rest: list[str]) -> int:
    from progtuning.runs.models import MODEL_ALIASES, fetch_model

    if args.action == "fetch":
        if not args.name:
            raise ProgtuningError("models fetch needs a name, e.g. `progtuning models fetch mpnet-base`")
        print(fetch_model(args.name))
        return 0
    for name, description in MODEL_ALIASES.items():
        print(f"{name:<14} {description}")
    return 0


def _bench(args, rest: list[str]) -> int:
    from progtuning.runs.bench import run_from_args

    run_from_args(args)
    return 0


def _sweep(args, rest: list[str]) -> int:
    from progtuning.runs.sweep import run_sweep, summarize
    from progtuning.runs.sweep_grid import load_sweep

    sweep = load_sweep(args.config, output_dir=args.output_dir, parallel=args.parallel, only=args.only)
    outcomes = run_sweep(sweep, dry_run=args.dry_run)
    return 1 if summarize(outcomes)["failed"] else 0


def _report(args, rest: list[str]) -> int:
    from progtuning.runs.report import build_report

    from progtuning.runs.report_study import goal_lines

    if args.bootstrap < 0:
        raise ProgtuningError(f"--bootstrap must be 0 (no intervals) or a number of resamples, got {args.bootstrap}")
    pairs = [tuple(p.split(":")) for p in args.compare]
    bad = [text for text, pair in zip(args.compare, pairs) if len(pair) != 2 or not all(pair) or pair[0] == pair[1]]
    if bad:
        raise ProgtuningError(f"--compare {bad[0]!r} must be two different arms as ARM:OTHER, e.g. prog-contrib:prog-fast")
    written = build_report(
        args.dirs, args.out, split=args.split, markdown=args.markdown, title=args.title, plots=not args.no_plots,
        bootstrap=args.bootstrap, compare=pairs, tasks=_names(args.tasks), arms=_names(args.arms),
    )
    print(f"{written['runs']} runs, {len(written['rows'])} table rows, {written['probes']} probe(s) -> {written['markdown']}")
    if written["comparisons"]:
        print("\n".join(goal_lines(written["goal"])))
    return 0


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _probe(args, rest: list[str]) -> int:
    from progtuning.runs.config import load_config, parse_overrides
    from progtuning.runs.probe import run_probe

    def ints(text: str | None) -> list[int] | None:
        try:
            return [int(v) for v in text.split(",") if v.strip()] if text else None
        except ValueError:
            raise ProgtuningError(f"expected comma-separated integers, got {text!r}")

    # the paper's Figure 1 trains the embeddings with each block, whatever the default preset
    config = load_config(args.config, parse_overrides(rest), defaults={"embeddings": "always"})
    parallel = ints(args.parallel)
    summary = run_probe(
        config, blocks=ints(args.blocks), out_dir=args.out, seeds=ints(args.seeds), full=not args.no_full,
        parallel=parallel[0] if parallel else 1,
    )
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
