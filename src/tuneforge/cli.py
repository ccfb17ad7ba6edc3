"""The `tuneforge` command: one subcommand per verb, each a plain function.

Every verb takes the experiment file, optional `dotted.key=value` overrides and
`--run-dir`. Heavy libraries are imported inside the verb that needs them, so
`tuneforge --help` and `tuneforge config` stay fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from tuneforge import __version__
from tuneforge.errors import TuneforgeError

OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")

# Verbs whose issue has not landed yet say so and exit 2.
PLANNED = {
    "generate": 5,
    "chat": 5,
    "merge": 5,
    "serve": 5,
    "rag": 6,
    "demo": 7,
    "eval": 9,
}


def _experiment(args: argparse.Namespace):
    from tuneforge.config import load_experiment

    return load_experiment(args.file, args.overrides)


def _run_dir(args: argparse.Namespace, experiment, verb: str):
    from tuneforge.run import RunDir

    return RunDir(experiment, args.run_dir).start(verb)


# --------------------------------------------------------------------------- verbs


def cmd_config(args: argparse.Namespace) -> int:
    from tuneforge import config as cfg

    if args.schema:
        import json

        print(json.dumps(cfg.Experiment.model_json_schema(), indent=2))
        return 0
    if args.explain:
        from tuneforge.explain import explain

        print(explain())
        return 0
    if not args.file:
        raise TuneforgeError("config needs an experiment file (or --explain / --schema)")
    print(_experiment(args).to_yaml(), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tuneforge.data import report
    from tuneforge.data.prepare import prepare

    experiment = _experiment(args)
    run = _run_dir(args, experiment, "prepare")
    result = prepare(experiment, run)
    print(report.summary(result))
    print(f"prepared data written to {run.sub('data')} (report.md, token_lengths.png)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    experiment = _experiment(args)
    if experiment.train.backend == "openai":
        raise TuneforgeError("train.backend: openai arrives with issue #8; use backend: local for now")
    from tuneforge.train.local import is_main_process, train_local

    run = _run_dir(args, experiment, "train") if is_main_process() else _run_dir_quiet(args, experiment)
    summary = train_local(experiment, run, resume=getattr(args, "resume", False))
    if is_main_process():
        print(f"trained {summary['steps']} steps in {summary['seconds']} s "
              f"({summary['supervised_tokens_per_s']} supervised tokens/s); run in {run.path}")
    return 0


def _run_dir_quiet(args: argparse.Namespace, experiment):
    from tuneforge.run import RunDir

    return RunDir(experiment, args.run_dir)


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline, in order, as far as its verbs exist."""
    experiment = _experiment(args)
    run = _run_dir(args, experiment, "run")
    print(f"run directory: {run.path}")
    for verb in ("prepare", "train", "eval"):
        issue = PLANNED.get(verb)
        if issue is not None:
            print(f"{verb}: not available yet (issue #{issue}); stopping here")
            break
        VERBS[verb][0](args)
    print(f"run written to {run.path}")
    return 0


def _planned(verb: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        _experiment(args)  # a bad file is still reported as such
        print(f"tuneforge {verb}: not implemented yet (issue #{PLANNED[verb]})", file=sys.stderr)
        return 2

    return cmd


VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "prepare": (cmd_prepare, "turn raw data into validated chat examples, with a token and cost report"),
    "train": (cmd_train, "fine-tune: QLoRA SFT locally, or a hosted OpenAI job"),
    "generate": (_planned("generate"), "batched answers for a file of prompts"),
    "chat": (_planned("chat"), "chat in the terminal with the base or fine-tuned model"),
    "merge": (_planned("merge"), "merge the adapter into a full-precision copy of the base"),
    "rag": (_planned("rag"), "build or query the retriever over your documents"),
    "eval": (_planned("eval"), "compare base, fine-tuned, RAG and hosted systems in one report"),
    "demo": (_planned("demo"), "open the Gradio chat page"),
    "serve": (_planned("serve"), "serve an OpenAI-compatible HTTP API"),
    "run": (cmd_run, "the whole pipeline: prepare, train, eval"),
    "config": (cmd_config, "print the resolved experiment, --explain every key, or --schema"),
}


# --------------------------------------------------------------------------- parser


def _add_common(sub: argparse.ArgumentParser, file_required: bool = True) -> None:
    sub.add_argument("file", nargs=None if file_required else "?", help="the experiment YAML file")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    sub.add_argument("--run-dir", help="run directory (default: runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune open-weights chat models from one YAML experiment file.",
    )
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    subs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (func, help_text) in VERBS.items():
        sub = subs.add_parser(verb, help=help_text, description=help_text)
        if verb == "rag":
            sub.add_argument("action", choices=["build", "query", "eval"], help="what to do with the retriever")
        _add_common(sub, file_required=verb != "config")
        if verb == "train":
            sub.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        if verb == "config":
            sub.add_argument("--explain", action="store_true", help="list every key with its default and description")
            sub.add_argument("--schema", action="store_true", help="print the JSON schema of the experiment file")
        sub.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands out positionals greedily, so overrides written after an option land here.
    stray = [item for item in extra if not OVERRIDE.match(item)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args) or 0
    except TuneforgeError as exc:
        print(f"tuneforge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tuneforge {args.verb}: interrupted", file=sys.stderr)
        return 130
