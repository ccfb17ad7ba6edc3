"""`tuneforge sweep FILE`: the experiment once per point of its `sweep` section, each a normal run.

    runs/<name>/sweep/sweep.json             the points, the metric that ranks them, the executor
    runs/<name>/sweep/<point>/               one run directory per point (config.yaml, adapter/, eval/, ...)
    runs/<name>/sweep/<point>/point.json     the point's values and status: running, done, stopped or failed
    runs/<name>/sweep/prepared/<key>/        prepared data shared by every point whose data settings agree
    runs/<name>/sweep/eval-cache/            one answer cache for all points: base is evaluated once
    runs/<name>/sweep/compare/               `tuneforge compare` of the points, written when the sweep ends

A point is named after its values (`lr=0.0001-r=8`), so adding a value to a list keeps every finished point.
Running the sweep again skips finished points and resumes an interrupted one from its newest checkpoint.
Points run one after another, or as Ray tasks (`--executor ray`), one GPU each where the cluster has GPUs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_dir, atomic_write_json, file_sha256, read_jsonl
from tuneforge.config import Experiment, Range, SweepSection, load_experiment
from tuneforge.errors import ConfigError, TuneforgeError

STATE = "sweep.json"
POINT = "point.json"
FINAL = ("done", "stopped")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "precision", "recall", "roc_auc")
GENERATION_METRICS = ("similarity", "quality", "rouge_l", "bleu", "perplexity", "tool_function", "tool_call")
# environment a Ray worker needs to find models offline; secrets (OPENAI_API_KEY, ...) are never sent through Ray
RAY_ENV = (
    "TUNEFORGE_HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OPENAI_BASE_URL",
)


@dataclass
class Point:
    slug: str
    values: dict[str, Any]
    experiment: Experiment


# --------------------------------------------------------------------------- planning


def draw(sweep: SweepSection, seed: int) -> list[dict[str, Any]]:
    """The points: every combination (grid), or `random` of them drawn with the seed, none repeated."""
    keys = list(sweep.params)
    if sweep.random is None:
        return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.params[k] for k in keys))]
    rng = random.Random(seed)
    if not any(isinstance(v, Range) for v in sweep.params.values()):
        grid = list(itertools.product(*(sweep.params[k] for k in keys)))
        return [dict(zip(keys, combo)) for combo in rng.sample(grid, min(sweep.random, len(grid)))]
    points, seen = [], set()
    for _ in range(sweep.random * 50):
        point = {k: _draw_one(v, rng) for k, v in sweep.params.items()}
        fingerprint = json.dumps(point, sort_keys=True, default=str)
        if fingerprint not in seen:
            seen.add(fingerprint)
            points.append(point)
        if len(points) == sweep.random:
            break
    return points


def _draw_one(values, rng: random.Random):
    if isinstance(values, list):
        return rng.choice(values)
    if values.log:
        x = math.exp(rng.uniform(math.log(values.low), math.log(values.high)))
    else:
        x = rng.uniform(values.low, values.high)
    return int(round(x)) if values.integer else float(f"{x:.3g}")


def slug(values: dict[str, Any], taken: set[str]) -> str:
    """A folder name made of the values: the last part of each key (the whole key when two share it)."""
    lasts = [k.rsplit(".", 1)[-1] for k in values]
    words = []
    for key, value in values.items():
        short = key.rsplit(".", 1)[-1]
        name = short if lasts.count(short) == 1 else key
        words.append(f"{name}={_word(value)}")
    base = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "-".join(words))[:80].strip("._-") or "point"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _word(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and ("/" in value or "." in Path(value).suffix):
        return Path(value).stem or value
    if isinstance(value, list):
        return "+".join(_word(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}{_word(v)}" for k, v in value.items())
    return str(value)


def metric_of(experiment: Experiment) -> tuple[str, str, str]:
    """(system, metric, goal) that rank the points, as the sweep section names them."""
    sweep = experiment.sweep
    labelled = experiment.data.label is not None
    name = sweep.metric
    if name == "auto":
        system, metric = "finetuned", "accuracy" if labelled else "similarity"
    elif "." in name:
        system, metric = name.rsplit(".", 1)
    else:
        system, metric = "finetuned", name
    goal = sweep.goal if sweep.goal != "auto" else ("min" if metric == "perplexity" else "max")
    return system, metric, goal


def _metric_problems(experiment: Experiment, system: str, metric: str) -> list[str]:
    labelled = experiment.data.label is not None
    allowed = CLASSIFICATION_METRICS if labelled else GENERATION_METRICS
    problems = []
    if metric not in allowed:
        mode = "classification (data.label is set)" if labelled else "generation (no data.label)"
        problems.append(
            f"sweep.metric: {metric!r} is not a metric eval produces for {mode}; allowed: {', '.join(allowed)}"
        )
    systems = set(experiment.eval.systems) | ({"majority"} if labelled else set())
    if system not in systems:
        problems.append(
            f"sweep.metric: system {system!r} is not in eval.systems ({', '.join(experiment.eval.systems)}), "
            "so eval never scores it"
        )
    if metric == "perplexity" and system.startswith("openai:"):
        problems.append(
            f"sweep.metric: {system} gives no perplexity (a hosted model returns no log-probabilities of the reference)"
        )
    return problems


def plan(experiment: Experiment, overrides: list[str] | tuple[str, ...] = ()) -> list[Point]:
    """Every point as a validated experiment; every problem of every point is raised before anything runs."""
    sweep = experiment.sweep
    source = str(experiment._source)
    if sweep is None:
        raise TuneforgeError(
            f"{source} has no sweep section: add sweep: {{params: {{train.lr: [1e-4, 2e-4]}}}} "
            "(see `tuneforge config --explain`)"
        )
    problems: list[str] = []
    if experiment.train.backend != "local":
        problems.append(
            "sweep: points train locally (train.backend: local); a sweep of hosted jobs would bill every point"
        )
    if experiment.data.feedback:
        problems.append(
            "sweep: data.feedback continues one run's adapter round after round; sweep a plain data.train instead"
        )
    system, metric, _ = metric_of(experiment)
    problems += _metric_problems(experiment, system, metric)
    points: list[Point] = []
    taken: set[str] = set()
    for values in draw(sweep, experiment.seed):
        try:
            point = load_experiment(source, overrides, point=values)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
            continue
        problems += [p for p in _metric_problems(point, system, metric) if p not in problems]
        points.append(Point(slug(values, taken), values, point))
    if problems:
        raise ConfigError(source, problems)
    return points


def prepare_key(experiment: Experiment) -> str:
    """What prepare's output depends on: the data settings and files, the tokenizer, the seed, retrieval."""
    parts: dict[str, Any] = {
        "data": experiment.data.model_dump(mode="json"),
        "tokenizer": [experiment.model.ref, experiment.model.revision, experiment.model.trust_remote_code],
        "seed": experiment.seed,
        "method": experiment.train.method,
        "rag": experiment.rag.model_dump(mode="json") if experiment.rag else None,
    }
    files = {}
    for name in ("train", "valid"):
        value = getattr(experiment.data, name)
        if value and experiment.resolve_path(value).is_file():
            files[name] = file_sha256(experiment.resolve_path(value))
    parts["files"] = files
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- one point


def finished_curves(root: Path, me: str) -> list[list[dict]]:
    """The metrics.jsonl records of every point under `root` but `me` that has finished (done or stopped)."""
    curves = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != me):
        status = _read_json(folder / POINT).get("status")
        if status in FINAL and (folder / "metrics.jsonl").exists():
            curves.append(read_jsonl(folder / "metrics.jsonl"))
    return curves


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def link_prepared(shared: Path, point: Path) -> None:
    """The shared prepared data (and retriever index) into the point's folder, hard-linked where the disk allows."""
    for part in ("data", "rag"):
        source = shared / part
        if not source.is_dir():
            continue
        with atomic_dir(point / part) as tmp:
            for path in source.rglob("*"):
                if path.is_file():
                    target = tmp / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path, target)
                    except OSError:
                        shutil.copy2(path, target)


def run_point(
    source: str,
    overrides: list[str],
    values: dict,
    folder: str,
    shared: str,
    eval_cache: str,
    metric: tuple[str, str],
    early_stop: float | None,
) -> dict:
    """Train and evaluate one point in its folder; the same function runs in-process or as a Ray task."""
    from tuneforge.eval.harness import run_eval
    from tuneforge.run import RunDir
    from tuneforge.train import callbacks as cb

    experiment = load_experiment(source, overrides, point=values)
    run = RunDir(experiment, folder)
    run.eval_cache = run.base_eval_cache = Path(eval_cache)
    run.start("sweep")
    record = {
        "values": values,
        "status": "running",
        "started": time.time(),
        "host": os.uname().nodename,
        "pid": os.getpid(),
    }
    atomic_write_json(run.sub(POINT), record)
    try:
        shared_manifest = json.loads((Path(shared) / "manifest.json").read_text(encoding="utf-8"))
        if (
            _read_json(run.manifest_path).get("data", {}).get("sha256") != shared_manifest["data"]["sha256"]
            or not run.sub("data").is_dir()
        ):
            link_prepared(Path(shared), run.path)
        for section in ("data", "rag"):
            if section in shared_manifest:
                run.record(section, shared_manifest[section])
        stopper = None
        if early_stop is not None:
            finished = functools.partial(finished_curves, run.path.parent, run.path.name)
            stopper = cb.MedianStop(finished, experiment.data.label is not None, early_stop)
        checkpoint = cb.latest_complete_checkpoint(run.sub("checkpoints"))
        if checkpoint is not None:
            print(f"point {run.path.name}: resuming its interrupted training from {checkpoint.name}", flush=True)
        from tuneforge.train import recipe

        train = recipe(experiment.train.method)
        summary = train(experiment, run, resume=checkpoint is not None, callbacks=[stopper] if stopper else None)
        if stopper is not None and stopper.reason:
            record.update(status="stopped", reason=stopper.reason, steps=summary.get("steps"))
        else:
            run_eval(experiment, run)
            metrics = _read_json(run.sub("eval", "metrics.json"))
            record.update(
                status="done", value=(metrics.get(metric[0]) or {}).get(metric[1]), steps=summary.get("steps")
            )
    except TuneforgeError as exc:
        record.update(status="failed", error=str(exc))
    except Exception as exc:  # out of memory at a large rank, a library fault: this point fails, the others still run
        import traceback

        traceback.print_exc()
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    record["finished"] = time.time()
    atomic_write_json(run.sub(POINT), record)
    return record


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    experiment: Experiment,
    root: Path,
    overrides: list[str] | tuple[str, ...] = (),
    executor: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Run every point not yet finished; returns {"points": [...], "best": ..., "compare": folder}."""
    from tuneforge.compare import compare_runs

    points = plan(experiment, overrides)
    system, metric, goal = metric_of(experiment)
    root = root.resolve()
    _refuse_changed(root, points)
    keys = {p.slug: prepare_key(p.experiment) for p in points}  # hashes the data files once
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        root / STATE,
        {
            "source": str(experiment._source),
            "overrides": list(overrides),
            "metric": f"{system}.{metric}",
            "goal": goal,
            "executor": executor,
            "early_stop": experiment.sweep.early_stop,
            "points": [{"slug": p.slug, "values": p.values, "prepared": keys[p.slug]} for p in points],
        },
    )
    todo = [p for p in points if _read_json(root / p.slug / POINT).get("status") not in FINAL]
    done = len(points) - len(todo)
    print(
        f"sweep: {len(points)} points ({'random' if experiment.sweep.random else 'grid'} "
        f"over {', '.join(experiment.sweep.params)}), "
        f"ranked by {system}.{metric} ({goal}); {done} finished before, {len(todo)} to run, in {root}",
        flush=True,
    )
    shared = _prepare_shared(root, todo, keys)
    jobs = [
        dict(
            source=str(experiment._source),
            overrides=list(overrides),
            values=p.values,
            folder=str(root / p.slug),
            shared=str(shared[keys[p.slug]]),
            eval_cache=str(root / "eval-cache"),
            metric=(system, metric),
            early_stop=experiment.sweep.early_stop_margin if experiment.sweep.early_stop else None,
        )
        for p in todo
    ]
    if executor == "ray":
        _run_on_ray(jobs, ray_address, any(p.experiment.model.device != "cpu" for p in todo))
    else:
        for n, (point, job) in enumerate(zip(todo, jobs), done + 1):
            print(
                f"\n[{n}/{len(points)}] {point.slug}: " + ", ".join(f"{k}={v!r}" for k, v in point.values.items()),
                flush=True,
            )
            result = run_point(**job)
            _say(point.slug, result, metric)
    results = [{"slug": p.slug, **_read_json(root / p.slug / POINT)} for p in points]
    best, report = None, None
    if any(r.get("status") == "done" for r in results):
        report = root / "compare"
        best = compare_runs([root], report)["best"]  # ties go to the lower valid loss there
    return {"points": results, "best": best, "compare": report}


def _say(slug: str, result: dict, metric: str) -> None:
    if result["status"] == "done":
        print(f"point {slug}: {metric} {result.get('value')}", flush=True)
    elif result["status"] == "stopped":
        print(f"point {slug}: stopped early ({result['reason']})", flush=True)
    else:
        print(f"point {slug}: failed: {result.get('error')}", file=sys.stderr, flush=True)


def _refuse_changed(root: Path, points: list[Point]) -> None:
    """A finished point whose resolved experiment differs from what the file now says would mix two experiments."""
    import yaml

    from tuneforge.compare import flat

    changed = []
    for point in points:
        folder = root / point.slug
        if _read_json(folder / POINT).get("status") not in FINAL or not (folder / "config.yaml").exists():
            continue
        before = flat(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))
        now = flat(point.experiment.model_dump(mode="json"))
        keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if keys:
            changed.append(f"{point.slug} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    if changed:
        raise TuneforgeError(
            f"the experiment changed since these finished points ran: {'; '.join(changed)}. "
            "Their results would not compare with new ones: sweep into a new --run-dir, "
            f"or delete those folders under {root}"
        )


def _prepare_shared(root: Path, todo: list[Point], keys: dict[str, str]) -> dict[str, Path]:
    """Prepare once per group of points whose data settings agree (and build their retriever index once)."""
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.rag.retriever import augment_examples, ensure_index
    from tuneforge.run import RunDir

    folders: dict[str, Path] = {}
    for point in todo:
        key = keys[point.slug]
        if key in folders:
            continue
        folder = folders[key] = root / "prepared" / key
        run = RunDir(point.experiment, folder)
        if (folder / "data" / "report.json").exists() and run.read_manifest().get("data"):
            print(f"prepared data {key}: reused from {folder}", flush=True)
        else:
            sharing = sum(keys[p.slug] == key for p in todo)
            print(f"preparing the data once for {sharing} point{'s' if sharing > 1 else ''} into {folder}", flush=True)
            run.start("sweep prepare")
            prepare(point.experiment, run, load_tokenizer(point.experiment.model), retrieve=augment_examples)
        if point.experiment.rag is not None:
            ensure_index(point.experiment, run)
    return folders


def _run_on_ray(jobs: list[dict], address: str | None, want_gpu: bool) -> None:
    try:
        import ray
    except ImportError:
        raise TuneforgeError(
            "--executor ray needs Ray: pip install 'ray[default]' (on every machine of the cluster)"
        ) from None
    env = {k: os.environ[k] for k in RAY_ENV if k in os.environ}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        print(f"ray: connected to the cluster at {address}", flush=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
        print(
            f"ray: no --ray-address or RAY_ADDRESS: started a local Ray instance with {os.cpu_count()} CPUs", flush=True
        )
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        per_point = {"num_gpus": 1} if want_gpu and gpus else {"num_cpus": 1}
        print(
            f"ray: {len(jobs)} points as tasks with {per_point} each "
            f"({gpus:g} GPUs, {ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster)",
            flush=True,
        )
        task = ray.remote(max_retries=0, **per_point)(run_point)
        pending = {task.remote(**job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task died (out of memory, a lost node): the point stays resumable
                    result = {
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    }
                _say(Path(job["folder"]).name, result, job["metric"][1])
    finally:
        ray.shutdown()
