"""`tuneforge prepare`: raw data to validated chat examples in runs/<name>/data/, with a report.

    read -> (tables: clean cells, drop/fill empties) -> check format -> dedupe -> sample
         -> tokenize with the model's chat template -> length policy -> split -> write

Nothing is written unless every stage passed (or the user asked to drop invalid
records); the whole data folder is replaced at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_sha256
from tuneforge.data import report as reporting
from tuneforge.data import split as splitting
from tuneforge.data.collect import Collected, DataError, Preparer
from tuneforge.data.records import Example, Problem, label_summary
from tuneforge.errors import ConfigError, TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import DataSection, Experiment
    from tuneforge.run import RunDir

SHOWN_PROBLEMS = 30

# data.rag's step: (experiment, run, the Collected sources, the tokenizer's special tokens, progress) -> the report's
# rag section; it puts passages into the examples in place (tuneforge.rag.retriever.augment_examples)
Retrieve = Callable[["Experiment", "RunDir", list[Collected], tuple[str, ...], bool], dict[str, Any]]


@dataclass
class Split:
    """The examples written: train, and valid as given or carved out of train."""

    train: list[Example]
    valid: list[Example]


def _fail_listing(problems: list[Problem]) -> str:
    from collections import Counter

    errors = [p for p in problems if p.severity == "error"]
    codes = Counter(p.code for p in errors)
    lines = [
        f"{len(errors)} invalid records ({', '.join(f'{c} {n}' for c, n in codes.most_common())}); nothing was written"
    ]
    lines += [f"  {p}" for p in errors[:SHOWN_PROBLEMS]]
    if len(errors) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(errors) - SHOWN_PROBLEMS} more")
    lines.append("  fix them, or set data.on_invalid: drop to skip them (they go to rejected.jsonl)")
    return "\n".join(lines)


def prepare(
    experiment: Experiment, run: RunDir, tokenizer, progress: bool = True, retrieve: Retrieve | None = None
) -> dict[str, Any]:
    """Run every stage for the experiment and write runs/<name>/data/. Returns the report.

    tokenizer: the model's (tuneforge.models.load_tokenizer(experiment.model)); None only when data.train is unset,
    which is refused first. retrieve: the data.rag step, tuneforge.rag.retriever.augment_examples; the data layer
    knows no retriever, so a caller preparing a data.rag experiment hands it in.
    """
    _refuse_early(experiment, tokenizer)
    preparer = Preparer(experiment, tokenizer, progress)
    started = time.perf_counter()
    train, valid = _collect(preparer)
    read_done = time.perf_counter()
    retrieval = _retrieve(preparer, run, retrieve, train, valid)
    _measure(preparer, train, valid)
    seconds = {
        "read_clean_sample": round(read_done - started, 3),
        "tokenize": round(time.perf_counter() - read_done, 3),
    }
    _check(experiment.data, train, valid)
    split = _split(experiment, train, valid)
    report = _report(experiment, preparer, train, valid, split, seconds, retrieval)
    hashes = _write(run.sub("data"), report, split, _rejected(train, valid), experiment.data.max_length)
    run.record("data", {"sha256": hashes, "counts": report["counts"], "sources": report["sources"]})
    return report


def _refuse_early(experiment: Experiment, tokenizer) -> None:
    """What needs no data read is refused before any is."""
    if experiment.data.train is None:
        raise ConfigError(str(experiment._source), ["data.train: no training data named"])
    if tokenizer is None:
        raise TypeError("prepare needs the model's tokenizer: tuneforge.models.load_tokenizer(experiment.model)")


def _collect(preparer: Preparer) -> tuple[Collected, Collected | None]:
    data = preparer.data
    train = preparer.collect("data.train", data.train, data.sample)
    valid = preparer.collect("data.valid", data.valid, None) if data.valid else None
    return train, valid


def _retrieve(
    preparer: Preparer, run: RunDir, retrieve: Retrieve | None, train: Collected, valid: Collected | None
) -> dict[str, Any] | None:
    """data.rag: passages go into the examples before tokenizing, so lengths and the length policy count them."""
    if not preparer.data.rag:
        return None
    if retrieve is None:
        raise TuneforgeError(
            "data.rag: prepare needs the retrieval step: "
            "prepare(..., retrieve=tuneforge.rag.retriever.augment_examples)"
        )
    special = tuple(preparer.encoder.tokenizer.all_special_tokens)
    return retrieve(preparer.experiment, run, _present(train, valid), special, preparer.progress)


def _measure(preparer: Preparer, train: Collected, valid: Collected | None) -> None:
    for part in _present(train, valid):
        preparer.measure(part)


def _check(data: DataSection, train: Collected, valid: Collected | None) -> None:
    """With on_invalid: error, any invalid record stops prepare here, before anything is split or written."""
    problems = _problems(train, valid)
    if data.on_invalid == "error" and any(p.severity == "error" for p in problems):
        raise DataError(_fail_listing(problems))


def _split(experiment: Experiment, train: Collected, valid: Collected | None) -> Split:
    data = experiment.data
    if valid is None:
        labelled = data.label or any(e.label for e in train.examples)
        labels = [e.label for e in train.examples] if labelled else None
        split = Split(*splitting.split(train.examples, data.valid_split, experiment.seed, labels))
        stratified = " (stratified by label)" if labels else ""
        train.stage(f"split off {data.valid_split:.0%} for valid{stratified}", len(split.train))
    else:
        split = Split(train.examples, valid.examples)
    if not split.train:
        raise DataError("no training examples are left after the stages above; see the counts in the report")
    return split


def _report(
    experiment: Experiment,
    preparer: Preparer,
    train: Collected,
    valid: Collected | None,
    split: Split,
    seconds: dict[str, float],
    retrieval: dict[str, Any] | None,
) -> dict[str, Any]:
    data = experiment.data
    problems = _problems(train, valid)
    stages = {"train": train.stages}
    if valid is not None:
        stages["valid"] = valid.stages
    labels = {"train": label_summary(split.train), "valid": label_summary(split.valid)}
    report: dict[str, Any] = {
        "name": experiment.name,
        "sources": {"train": data.train, "valid": data.valid},
        "stages": stages,
        "cleaning": train.cleaning,
        "counts": {"train": len(split.train), "valid": len(split.valid), "rejected": len(_rejected(train, valid))},
        "tokens": {"train": reporting.token_stats(split.train), "valid": reporting.token_stats(split.valid)},
        "labels": {k: v for k, v in labels.items() if v},
        "problems": {
            "errors": sum(p.severity == "error" for p in problems),
            "warnings": sum(p.severity == "warning" for p in problems),
            "by_code": _by_code(problems),
            "first": [p.to_json() for p in problems[:50]],
        },
        "max_length": data.max_length,
        "overflow": data.overflow,
        "end_of_turn_token": preparer.encoder.end_of_turn,
        "seconds": seconds,
    }
    if retrieval is not None:
        report["rag"] = retrieval
    if experiment.train.backend == "local":
        report["local"] = reporting.local_plan(split.train, experiment, bool(split.valid))
    else:
        report["openai"] = reporting.openai_estimate(split.train, experiment)
    return report


def _write(
    folder: Path, report: dict[str, Any], split: Split, rejected: list[dict[str, Any]], max_length: int
) -> dict[str, str]:
    """Write the data folder in one swap; the files' hashes join the report before it is written. Returns them."""
    with atomic_dir(folder) as tmp:
        atomic_write_jsonl(tmp / "train.jsonl", (e.openai_record() for e in split.train))
        atomic_write_jsonl(tmp / "valid.jsonl", (e.openai_record() for e in split.valid))
        atomic_write_jsonl(tmp / "train.meta.jsonl", (e.meta_record() for e in split.train))
        atomic_write_jsonl(tmp / "valid.meta.jsonl", (e.meta_record() for e in split.valid))
        if rejected:
            atomic_write_jsonl(tmp / "rejected.jsonl", rejected)
        hashes = {name: file_sha256(tmp / name) for name in ("train.jsonl", "valid.jsonl")}
        report["sha256"] = hashes
        lengths = {"train": [e.n_tokens for e in split.train], "valid": [e.n_tokens for e in split.valid]}
        reporting.histogram(tmp / "token_lengths.png", lengths, max_length)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", reporting.markdown(report))
    return hashes


def _present(train: Collected, valid: Collected | None) -> list[Collected]:
    return [part for part in (train, valid) if part is not None]


def _problems(train: Collected, valid: Collected | None) -> list[Problem]:
    return [p for part in _present(train, valid) for p in part.problems]


def _rejected(train: Collected, valid: Collected | None) -> list[dict[str, Any]]:
    return [r for part in _present(train, valid) for r in part.rejected]


def _by_code(problems: list[Problem]) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(p.code for p in problems).most_common())
