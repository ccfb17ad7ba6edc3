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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tuneforge import __version__
from tuneforge.errors import TuneforgeError, describe_os_error

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _experiment(args: argparse.Namespace):
    from tuneforge.config import load_experiment

    return load_experiment(args.file, args.overrides)


def _run_dir(args: argparse.Namespace, experiment: Experiment, verb: str):
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
    from tuneforge.models import load_tokenizer
    from tuneforge.rag.retriever import augment_examples

    experiment = _experiment(args)
    run = _run_dir(args, experiment, "prepare")
    if experiment.data.feedback:
        from tuneforge.feedback.rounds import feedback_data

        experiment = feedback_data(experiment, run)
    tokenizer = (
        load_tokenizer(experiment.model) if experiment.data.train is not None else None
    )  # None: prepare says why
    result = prepare(experiment, run, tokenizer, retrieve=augment_examples)
    print(report.summary(result))
    print(f"prepared data written to {run.sub('data')} (report.md, token_lengths.png)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    experiment = _experiment(args)
    if experiment.train.backend == "openai":
        from tuneforge.train.openai_backend import make_client, train_openai

        run = _run_dir(args, experiment, "train")
        if args.cancel:
            return train_openai(experiment, run, None, cancel=True)
        from tuneforge.data.prepare import prepare
        from tuneforge.models import load_tokenizer
        from tuneforge.rag.retriever import augment_examples

        make_client(experiment)  # a missing API key is refused before anything is prepared
        # prepared again each time: cheap next to a hosted job, and the upload never lags the config
        print("preparing the data (so the upload matches this config)", flush=True)
        has_data = experiment.data.train is not None
        tokenizer = load_tokenizer(experiment.model) if has_data else None  # None: prepare says why
        report = prepare(experiment, run, tokenizer, retrieve=augment_examples)
        return train_openai(experiment, run, report, yes=args.yes)
    if args.cancel:
        raise TuneforgeError("--cancel is for train.backend: openai jobs; stop a local run with Ctrl-C")
    from tuneforge.train.common import is_main_process

    run = _run_dir(args, experiment, "train") if is_main_process() else _run_dir_quiet(args, experiment)
    if experiment.data.feedback and is_main_process():
        from tuneforge.feedback.rounds import continue_from_current

        experiment = continue_from_current(experiment, run)
    from tuneforge.train import recipe

    train = recipe(experiment.train.method)
    summary = train(experiment, run, resume=getattr(args, "resume", False))
    if is_main_process() and summary.get("already_trained"):
        print(
            f"nothing to resume: this run already finished its {summary['steps']} steps, "
            f"and its adapter is in {run.sub('adapter')}. "
            "To train again, use a new --run-dir (or delete this run's checkpoints/)"
        )
    elif is_main_process():
        print(
            f"trained {summary['steps']} steps in {summary['seconds']} s "
            f"({summary['supervised_tokens_per_s']} supervised tokens/s); run in {run.path}"
        )
    return 0


def _existing_run(args: argparse.Namespace, experiment: Experiment):
    """The run a reading verb (generate, chat, serve, demo) answers from; it is never created or rewritten here."""
    from tuneforge.run import RunDir

    run = RunDir(experiment, args.run_dir)
    if not run.path.is_dir():
        print(
            f"note: no run directory at {run.path.resolve()} (runs/<name> under the working directory, or --run-dir); "
            "only base can answer",
            file=sys.stderr,
        )
    return run


def _default_system(run: RunDir) -> str:
    from tuneforge.engine.generation import available_systems

    found = available_systems(run)[-1]  # finetuned once trained, else base
    if found == "base":
        print(f"note: no adapter in {run.sub('adapter').resolve()}: answering with base", file=sys.stderr)
    return found


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.engine.generation import Settings
    from tuneforge.generate import answer_all, read_prompts, write_answers
    from tuneforge.systems import Systems

    experiment = _experiment(args)
    run = _existing_run(args, experiment)
    prompts = read_prompts(Path(args.input))
    system = args.system or _default_system(run)
    systems = Systems(experiment, run, system_prompt=args.system_prompt)
    _say_system_prompt(systems, system)
    settings = Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=experiment.seed)
    answers = answer_all(systems, system, prompts, settings, args.batch_size)
    written = write_answers(Path(args.output), system, prompts, answers)
    print(f"{written} answers from {system} written to {args.output}")
    return 0


def _say_system_prompt(systems, name: str) -> None:
    prompt = systems.system_prompt(name)
    if prompt:
        origin = "--system-prompt" if systems.system_prompt_override else "the run's training data"
        print(
            f"conversations without a system message get the system prompt from {origin}: {prompt!r} "
            "(--system-prompt '' for none)",
            file=sys.stderr,
        )


def cmd_chat(args: argparse.Namespace) -> int:
    from tuneforge.chat import chat_loop

    experiment = _experiment(args)
    run = _existing_run(args, experiment)
    tools = None
    if args.tools:
        tools = _read_tools(args.tools)
    return chat_loop(
        experiment, run, args.system or _default_system(run), system_prompt=args.system_prompt, tools=tools
    )


def _read_tools(path: str) -> list:
    """--tools: a JSON file holding OpenAI's tools list (or an object with a `tools` key), checked."""
    import json
    from pathlib import Path

    from tuneforge.data.tools import check_tools

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TuneforgeError(f"--tools {path}: {exc}") from None
    tools = value.get("tools") if isinstance(value, dict) else value
    problems = check_tools({"messages": [], "tools": tools}, f"--tools {path}")
    if problems or not tools:
        raise TuneforgeError("; ".join(str(p) for p in problems) or f"--tools {path}: no tools in it")
    return tools


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneforge.merge import merge

    experiment = _experiment(args)
    run = _run_dir(args, experiment, "merge")
    gguf = args.gguf or args.gguf_type is not None
    report = merge(experiment, run, gguf=gguf, dtype=args.dtype, gguf_type=args.gguf_type or "f16")
    print(f"merged model written to {report['merged']} ({report['dtype']})")
    if report["mismatches"]:
        print(
            f"{len(report['mismatches'])} of {report['probes']} probe answers differ between adapter and merged model:"
        )
        for m in report["mismatches"]:
            print(f"  {m['prompt'][:60]!r}: adapter {m['adapter'][:60]!r} vs merged {m['merged'][:60]!r}")
        if report["dtype"] != "float32":
            print(
                f"in {report['dtype']} the adapter's update can fall below the weights' rounding step: "
                f"`tuneforge merge --dtype float32` keeps it (twice the size), "
                f"or serve the adapter on its base (finetuned, vLLM LoRA)"
            )
    else:
        print(f"all {report['probes']} probe answers agree between the adapter and the merged model")
    drift = _print_gguf(report["gguf"], report["probes"]) if gguf else False
    return 1 if report["mismatches"] or drift else 0


def _print_gguf(entry: dict, probes: int) -> bool:
    """The GGUF export's lines; True when the GGUF's answers drift from the merged model's."""
    print(f"GGUF written to {entry['file']} ({entry['type']}, {entry['bytes'] / 2**20:.0f} MiB, {entry['seconds']} s)")
    if entry["metadata_fixed"]:
        print(f"  the converter's metadata did not match the run's; rewritten: {', '.join(entry['metadata_fixed'])}")
    if entry["modelfile"]:
        print(f"  for Ollama, in {Path(entry['modelfile']).parent}: ollama create NAME -f Modelfile")
    else:
        print(f"  {entry['modelfile_error']}")
    if "probe_error" in entry:
        print(f"  {entry['probe_error']}")
        return False
    for d in entry["drift"]:
        print(f"  {d['prompt'][:60]!r}: merged {d['merged'][:60]!r} vs GGUF {d['gguf'][:60]!r}")
    if entry["drift"]:
        print(f"{len(entry['drift'])} of {probes} probe answers differ between the merged model and the GGUF")
    else:
        print(f"all {probes} probe answers agree between the merged model and the GGUF")
    return bool(entry["drift"])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.engine.pool import shared_pool
    from tuneforge.serve.bounds import Limits
    from tuneforge.serve.finetuning import fine_tuning_router
    from tuneforge.serve.keys import check_binding, load_keys
    from tuneforge.serve.server import serve

    keys = load_keys(args.api_keys)
    check_binding(args.host, keys)  # before loading anything
    experiment = _experiment(args)
    run = _existing_run(args, experiment)
    shared_pool().max_adapters = args.max_adapters  # the process's bases, which every served adapter loads onto
    serve(
        experiment,
        run,
        host=args.host,
        port=args.port,
        system_prompt=args.system_prompt,
        max_batch=args.max_batch,
        routers=lambda served: fine_tuning_router(
            experiment, run, served, keys, python_graders=args.allow_python_graders
        ),
        keys=keys,
        max_upload=args.max_upload_mb << 20,
        allowed_hosts=tuple(args.allowed_host),
        limits=Limits(max_tokens=args.max_tokens, max_seconds=args.max_seconds),
    )
    return 0


def cmd_import_openai(args: argparse.Namespace) -> int:
    from tuneforge.train.openai_import import import_jobs

    written = import_jobs(args.job, args.all, Path(args.out), args.model, args.base_url, args.force)
    if written:
        print(f"next: tuneforge run {written[0]}  (the eval asks the hosted model too: keep OPENAI_API_KEY set)")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """tuneforge feedback FILE (the summary) | tuneforge feedback export FILE (the training files)."""
    from tuneforge.atomic import atomic_write_json, atomic_write_text
    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.feedback.summary import markdown, summarise

    if args.action_or_file in ("summary", "export"):
        action = args.action_or_file
        if args.file is None:
            raise TuneforgeError(f"tuneforge feedback {action} needs the experiment file")
    else:
        action = "summary"
        if args.file is not None:  # the first override, taken for a file
            args.overrides = [args.file, *args.overrides]
        args.file = args.action_or_file
    experiment = _experiment(args)
    run = _existing_run(args, experiment)
    records, problems = FeedbackStore(run.sub("feedback")).read()
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not records:
        raise TuneforgeError(
            f"no feedback yet in {run.sub('feedback')}: the demo's thumbs, corrections, votes and "
            "contributed examples are recorded there"
        )
    if action == "export":
        from tuneforge.feedback.export import export

        result = export(records, run.sub("feedback", "export"))
        for kind, found in result.items():
            print(
                f"{kind}: {found['lines']} lines -> {found['path']} "
                f"({found['duplicates']} duplicates, {found['invalid']} invalid left out)"
            )
        print(
            "train on them: data.train: <that file> (with train.method: dpo and data.format: preference "
            "for the pairs, train.method: kto for the rated answers), or data.feedback: true"
        )
        return 0
    summary = summarise(records)
    atomic_write_json(run.sub("feedback", "summary.json"), summary)
    text = markdown(summary)
    atomic_write_text(run.sub("feedback", "summary.md"), text)
    print(text, end="")
    print(f"(also in {run.sub('feedback', 'summary.md')} and summary.json)")
    return 0


def cmd_rag(args: argparse.Namespace) -> int:
    import json

    from tuneforge.rag import retriever as rag

    experiment = _experiment(args)
    run = _run_dir(args, experiment, f"rag {args.action}")
    if args.action == "build":
        summary = rag.build(experiment, run)
        print(
            f"indexed {summary['count']} chunks of {summary['documents']} documents "
            f"({summary['index']}, dim {summary['dim']}) in {run.sub('rag')}"
        )
        return 0
    if args.action == "query":
        question = " ".join(args.words).strip()
        if not question:
            raise TuneforgeError('rag query needs a question: tuneforge rag query FILE "your question"')
        hits = rag.ensure_index(experiment, run).search([question])[0]  # built first when missing or stale
        if args.json:
            print(json.dumps([h.to_json() for h in hits], indent=2, ensure_ascii=False))
        else:
            for n, hit in enumerate(hits, 1):
                print(
                    f"[{n}] {hit.score:.3f}  {hit.source}  ({hit.chunk_id})\n    {hit.text[:300].replace(chr(10), ' ')}"
                )
        return 0
    from tuneforge.atomic import atomic_write_json

    pairs = _question_source_pairs(experiment)
    report = rag.evaluate(rag.ensure_index(experiment, run), pairs, experiment.rag.k)
    atomic_write_json(run.sub("rag", "eval.json"), report)
    k = report["k"]
    print(
        f"recall@1 {report['recall@1']:.3f}, recall@{k} {report[f'recall@{k}']:.3f}, MRR {report['mrr']:.3f} "
        f"on {report['questions']} questions"
    )
    follow = report["multi_turn"]
    if follow["questions"]:
        print(
            f"  of which {follow['questions']} in conversations (retrieved with their earlier turns): "
            f"recall@1 {follow['recall@1']:.3f}, recall@{k} {follow[f'recall@{k}']:.3f}"
        )
    for miss in report["misses"]:
        print(
            f"  missed: {miss['question'][:70]!r} wants {miss['expected']}, "
            f"got {', '.join(dict.fromkeys(miss['retrieved'])) or 'nothing'}"
        )
    print(f"details in {run.sub('rag', 'eval.json')}")
    return 0


def _question_source_pairs(experiment: Experiment) -> list[tuple[str, str]]:
    """(user turns, meta.source) from eval.data: the conversations whose right document is known."""
    import json

    if not experiment.eval.data:
        raise TuneforgeError("rag eval reads question -> source pairs from eval.data (JSONL lines with meta.source)")
    path = experiment.resolve_path(experiment.eval.data)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        source = (record.get("meta") or {}).get("source")
        users = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
        if not source or not users:
            raise TuneforgeError(f"{path.name} line {number}: rag eval needs a user message and meta.source")
        pairs.append((users, source))
    return pairs


def cmd_sweep(args: argparse.Namespace) -> int:
    from tuneforge.run import RunDir
    from tuneforge.sweep import run_sweep

    experiment = _experiment(args)
    root = RunDir(experiment, args.run_dir).path / "sweep"
    result = run_sweep(experiment, root, args.overrides, executor=args.executor, ray_address=args.ray_address)
    counts: dict[str, int] = {}
    for point in result["points"]:
        counts[point.get("status", "not run")] = counts.get(point.get("status", "not run"), 0) + 1
    print("\nsweep: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    if result["best"]:
        print(
            f"best point: {result['best']['run']} ({result['best']['value']:.4g}); "
            f"report: {result['compare'] / 'compare.html'} (compare.json, best.yaml beside it)"
        )
    failed = counts.get("failed", 0)
    if failed:
        print(
            f"{failed} point{'s' if failed > 1 else ''} failed (see point.json in their folders); "
            "run the sweep again to retry them",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneforge.compare import compare_runs

    paths = [Path(p) for p in args.runs]
    sweeps = [p for p in paths if (p / "sweep.json").is_file()]
    out = (
        Path(args.out)
        if args.out
        else (sweeps[0] / "compare" if len(paths) == 1 and sweeps else Path("runs") / "compare")
    )
    summary = compare_runs(paths, out, metric=args.metric, goal=args.goal)
    print((out / "compare.md").read_text(encoding="utf-8"), end="")
    print(
        f"report: {out / 'compare.html'} (compare.json, compare.md, charts{', best.yaml' if summary['best'] else ''})"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.eval.harness import run_eval

    experiment = _experiment(args)
    run = _run_dir(args, experiment, "eval")
    if experiment.data.feedback:
        from tuneforge.feedback.rounds import with_previous

        experiment = with_previous(experiment, run)
    return run_eval(experiment, run)


def cmd_demo(args: argparse.Namespace) -> int:
    from tuneforge.demo.app import launch

    experiment = _experiment(args)
    run = _existing_run(args, experiment)
    return launch(
        experiment,
        run,
        host=args.host,
        port=args.port,
        share=args.share,
        system_prompt=args.system_prompt,
        allowed_hosts=tuple(args.allowed_host),
    )


def _run_dir_quiet(args: argparse.Namespace, experiment: Experiment):
    from tuneforge.run import RunDir

    return RunDir(experiment, args.run_dir)


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline: prepare, train (locally or on OpenAI), eval."""
    from tuneforge.eval.harness import check_graders

    experiment = _experiment(args)
    check_graders(experiment)  # a grader eval would refuse, found before training rather than after it
    run = _run_dir(args, experiment, "run")
    print(f"run directory: {run.path}")
    # with the openai backend, train prepares the data itself, just before it uploads it
    verbs = ("train", "eval") if experiment.train.backend == "openai" else ("prepare", "train", "eval")
    for verb in verbs:
        code = VERBS[verb][0](args)
        if code:
            return code
    print(f"run written to {run.path}")
    return 0


# --------------------------------------------------------------------------- arguments, verb by verb


def _file_arguments(sub: argparse.ArgumentParser, file_required: bool = True) -> None:
    sub.add_argument("file", nargs=None if file_required else "?", help="the experiment YAML file")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    sub.add_argument("--run-dir", help="run directory (default: runs/<name>)")


def _system_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--system",
        help="base, finetuned, adapter:<dir>, merged:<dir>, openai:<model>, each optionally "
        "with +rag (default: finetuned when trained)",
    )


def _system_prompt_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--system-prompt",
        help="system prompt for conversations that have none (default: the one the run trained with; '' for none)",
    )


def _train_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    sub.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sub.add_argument("--yes", action="store_true", help="openai backend: accept the cost estimate without asking")
    sub.add_argument("--cancel", action="store_true", help="openai backend: cancel this experiment's running job")


def _generate_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    _system_arguments(sub)
    _system_prompt_argument(sub)
    sub.add_argument("--input", required=True, help="JSONL of {'prompt': ...} or {'messages': [...]} lines")
    sub.add_argument("--output", required=True, help="where the answers go (JSONL)")
    sub.add_argument("--max-new-tokens", type=int, default=256)
    sub.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sub.add_argument("--batch-size", type=int, default=16)


def _chat_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    _system_arguments(sub)
    _system_prompt_argument(sub)
    sub.add_argument(
        "--tools",
        help="JSON file with the OpenAI tools list the model may call "
        "(default: the tools of the run's training data, if any)",
    )


def _merge_arguments(sub: argparse.ArgumentParser) -> None:
    from tuneforge.gguf_export import GGUF_TYPES

    _file_arguments(sub)
    sub.add_argument("--gguf", action="store_true", help="also export GGUF with llama.cpp's converter")
    sub.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        help="the GGUF's weights (implies --gguf; default f16): f32, f16, bf16, q8_0 by the converter, "
        "the k-quants where llama-quantize is found",
    )
    sub.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the merged weights (auto: the device's full dtype, bfloat16 on most GPUs; "
        "float32 keeps a small update exactly)",
    )


def _rag_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("action", choices=["build", "query", "eval"], help="what to do with the retriever")
    _file_arguments(sub)
    sub.add_argument("--json", action="store_true", help="query: print hits as JSON")


def _demo_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    _system_prompt_argument(sub)
    sub.add_argument("--host", help="interface to bind (default: demo.host, loopback)")
    sub.add_argument("--port", type=int, help="default: demo.port")
    sub.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs auth)")
    _allowed_host_argument(sub)


def _serve_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    _system_prompt_argument(sub)
    sub.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument(
        "--max-batch",
        type=_positive_int,
        default=16,
        help="most concurrent requests batched into one generate call (1: one at a time)",
    )
    sub.add_argument(
        "--max-adapters",
        type=_positive_int,
        default=16,
        help="fine-tuned adapters kept loaded on the shared base model; one more unloads the least recently used",
    )
    sub.add_argument(
        "--api-keys",
        metavar="FILE",
        help="file of API keys, one KEY or PROJECT:KEY a line (also: "
        "TUNEFORGE_API_KEYS, TUNEFORGE_API_KEYS_FILE); needed beyond loopback",
    )
    sub.add_argument("--max-upload-mb", type=_positive_int, default=512, help="largest file upload accepted")
    sub.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=4096,
        help="most tokens one answer may ask for (more: a 400); an unset max_tokens gets what the context leaves, "
        "up to this",
    )
    sub.add_argument(
        "--max-seconds",
        type=_positive_int,
        default=300,
        help="generation time one request may take; past it the answer ends with what was said (finish_reason length)",
    )
    sub.add_argument(
        "--allow-python-graders",
        action="store_true",
        help="accept python graders in reinforcement jobs and graders/run: they run their code on this machine, "
        "limited in time, memory, disk and network but able to read what the server's user can",
    )
    _allowed_host_argument(sub)


def _allowed_host_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--allowed-host",
        metavar="NAME",
        action="append",
        default=[],
        help="a Host name the server answers besides the loopback names and --host (repeat for more; '*': any, "
        "behind a proxy that checks them); pages of these names may also post to it",
    )


def _sweep_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub)
    sub.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: points one after another; ray: as tasks on a Ray cluster, one GPU each where it has GPUs",
    )
    sub.add_argument(
        "--ray-address", help="the Ray cluster (default: RAY_ADDRESS; without either, a local Ray instance)"
    )


def _compare_arguments(sub: argparse.ArgumentParser) -> None:  # run folders, not an experiment file
    sub.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or a sweep folder (runs/<name>/sweep)")
    sub.add_argument(
        "--metric",
        help="what ranks the runs: <system>.<metric> or <metric> of finetuned "
        "(default: the sweep's, else finetuned accuracy or similarity)",
    )
    sub.add_argument(
        "--goal", choices=["max", "min"], help="whether higher or lower is better (default: max, min for perplexity)"
    )
    sub.add_argument("--out", help="report folder (default: <sweep>/compare for one sweep, else runs/compare)")
    sub.set_defaults(overrides=[])


def _config_arguments(sub: argparse.ArgumentParser) -> None:
    _file_arguments(sub, file_required=False)
    sub.add_argument("--explain", action="store_true", help="list every key with its default and description")
    sub.add_argument("--schema", action="store_true", help="print the JSON schema of the experiment file")


def _feedback_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "action_or_file", metavar="[export] FILE", help="the experiment file, after 'export' to write training files"
    )
    _file_arguments(sub, file_required=False)


def _import_openai_arguments(sub: argparse.ArgumentParser) -> None:  # no experiment file: it writes them
    sub.add_argument("job", nargs="?", help="the fine-tuning job id (ftjob-...)")
    sub.add_argument("--all", action="store_true", help="every fine-tuning job of the account")
    sub.add_argument("--model", default="builtin:smollm2-135m-instruct", help="the open model to train locally")
    sub.add_argument("--out", default="imported", help="folder for one subfolder per job (default: imported)")
    sub.add_argument("--base-url", help="the API's address (default: OPENAI_BASE_URL, else OpenAI's)")
    sub.add_argument("--force", action="store_true", help="write over an experiment imported before")
    sub.set_defaults(overrides=[])


class Verb(NamedTuple):
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = _file_arguments


VERBS: dict[str, Verb] = {
    "prepare": Verb(cmd_prepare, "turn raw data into validated chat examples, with a token and cost report"),
    "train": Verb(cmd_train, "fine-tune: QLoRA SFT or DPO locally, or a hosted OpenAI job", _train_arguments),
    "generate": Verb(cmd_generate, "batched answers for a file of prompts", _generate_arguments),
    "chat": Verb(cmd_chat, "chat in the terminal with the base or fine-tuned model", _chat_arguments),
    "merge": Verb(cmd_merge, "merge the adapter into a full-precision copy of the base", _merge_arguments),
    "rag": Verb(cmd_rag, "build or query the retriever over your documents", _rag_arguments),
    "eval": Verb(cmd_eval, "compare base, fine-tuned, RAG and hosted systems in one report"),
    "demo": Verb(cmd_demo, "open the Gradio chat page", _demo_arguments),
    "serve": Verb(cmd_serve, "serve an OpenAI-compatible HTTP API", _serve_arguments),
    "run": Verb(cmd_run, "the whole pipeline: prepare, train, eval", _train_arguments),
    "sweep": Verb(
        cmd_sweep, "run the experiment once per point of its sweep section, then compare the points", _sweep_arguments
    ),
    "compare": Verb(
        cmd_compare,
        "one report across runs or a sweep: settings, curves, metrics, judge, cost, the best",
        _compare_arguments,
    ),
    "config": Verb(cmd_config, "print the resolved experiment, --explain every key, or --schema", _config_arguments),
    "feedback": Verb(
        cmd_feedback,
        "what the demo's users said: leaderboard and win rates; `feedback export FILE`: training files",
        _feedback_arguments,
    ),
    "import-openai": Verb(
        cmd_import_openai,
        "turn OpenAI fine-tuning jobs into local experiments: their files and settings",
        _import_openai_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune open-weights chat models from one YAML experiment file.",
    )
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    subs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, verb in VERBS.items():
        sub = subs.add_parser(name, help=verb.help, description=verb.help)
        verb.arguments(sub)
        sub.set_defaults(func=verb.run)
    return parser


def _quiet_libraries() -> None:
    """Silence what a user cannot act on: bitsandbytes' note that an optional CPU kernel package is absent (printed
    on every 4-bit load), and deprecation warnings raised from inside peft and transformers, not from our calls."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll on this platform
        return False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands out positionals greedily, so words written after an option land in `extra`.
    unknown_options = [item for item in extra if item.startswith("-")]
    if unknown_options:
        parser.error(f"unrecognized arguments: {' '.join(unknown_options)}")
    args.overrides = [*args.overrides, *extra]
    # the one verb with free text among its positionals: tuneforge rag query FILE "question"
    args.words = [o for o in args.overrides if not OVERRIDE.match(o)]
    args.overrides = [o for o in args.overrides if OVERRIDE.match(o)]
    if args.words and not (args.verb == "rag" and args.action == "query"):
        parser.error(f"not a dotted key=value override: {' '.join(args.words)}")
    try:
        return args.func(args) or 0
    except TuneforgeError as exc:
        print(f"tuneforge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tuneforge {args.verb}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a missing or unreadable file, a full disk, a busy port: the cause, not a traceback
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # `tuneforge config --explain | head`: the reader has what it wanted; stop quietly, as a
            # SIGPIPE-killed tool would, and keep Python's exit-time flush from complaining again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13
        if os.environ.get("TUNEFORGE_DEBUG"):
            raise
        print(f"tuneforge {args.verb}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
