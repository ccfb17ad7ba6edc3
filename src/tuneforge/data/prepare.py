"""`tuneforge prepare`: raw data to validated chat examples in runs/<name>/data/, with a report.

    read -> (tables: clean cells, drop/fill empties) -> check format -> dedupe -> sample
         -> tokenize with the model's chat template -> length policy -> split -> write

Nothing is written unless every stage passed (or the user asked to drop invalid
records); the whole data folder is replaced at once.
"""

from __future__ import annotations

import time
from typing import Any, Callable


from tuneforge.atomic import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_sha256
from tuneforge.data import report as reporting, split as splitting
from tuneforge.data.records import Problem, label_summary
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.data.collect import Collected, DataError, Preparer

SHOWN_PROBLEMS = 30

# data.rag's step: (experiment, run, the Collected sources, the tokenizer's special tokens, progress) -> the report's
# rag section; it puts passages into the examples in place (tuneforge.rag.retriever.augment_examples)
Retrieve = Callable[[Any, Any, list["Collected"], tuple[str, ...], bool], dict[str, Any]]


def _fail_listing(problems: list[Problem]) -> str:
    from collections import Counter

    errors = [p for p in problems if p.severity == "error"]
    codes = Counter(p.code for p in errors)
    lines = [f"{len(errors)} invalid records ({', '.join(f'{c} {n}' for c, n in codes.most_common())}); nothing was written"]
    lines += [f"  {p}" for p in errors[:SHOWN_PROBLEMS]]
    if len(errors) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(errors) - SHOWN_PROBLEMS} more")
    lines.append("  fix them, or set data.on_invalid: drop to skip them (they go to rejected.jsonl)")
    return "\n".join(lines)


def prepare(experiment, run, tokenizer, progress: bool = True, retrieve: Retrieve | None = None) -> dict[str, Any]:
    """Run every stage for the experiment and write runs/<name>/data/. Returns the report.

    tokenizer: the model's (tuneforge.models.load_tokenizer(experiment.model)); None only when data.train is unset,
    which is refused first. retrieve: the data.rag step, tuneforge.rag.retriever.augment_examples; the data layer
    knows no retriever, so a caller preparing a data.rag experiment hands it in.
    """
    data = experiment.data
    if data.train is None:
        raise ConfigError(str(experiment._source), ["data.train: no training data named"])
    if tokenizer is None:
        raise TypeError("prepare needs the model's tokenizer: tuneforge.models.load_tokenizer(experiment.model)")
    preparer = Preparer(experiment, tokenizer, progress)

    started = time.perf_counter()
    train = preparer.collect("data.train", data.train, data.sample)
    valid = preparer.collect("data.valid", data.valid, None) if data.valid else None
    read_done = time.perf_counter()
    retrieval = None
    if data.rag:
        if retrieve is None:
            raise TuneforgeError("data.rag: prepare needs the retrieval step: prepare(..., retrieve=tuneforge.rag.retriever.augment_examples)")
        retrieval = retrieve(experiment, run, [p for p in (train, valid) if p is not None],
                             tuple(preparer.encoder.tokenizer.all_special_tokens), progress)
    for part in (train, valid):
        if part is not None:
            preparer.measure(part)
    tokenized = time.perf_counter()

    everything = train.problems + (valid.problems if valid else [])
    if data.on_invalid == "error" and any(p.severity == "error" for p in everything):
        raise DataError(_fail_listing(everything))

    if valid is None:
        labels = [e.label for e in train.examples] if data.label or any(e.label for e in train.examples) else None
        train_examples, valid_examples = splitting.split(train.examples, data.valid_split, experiment.seed, labels)
        train.stage(f"split off {data.valid_split:.0%} for valid{' (stratified by label)' if labels else ''}", len(train_examples))
    else:
        train_examples, valid_examples = train.examples, valid.examples
    if not train_examples:
        raise DataError("no training examples are left after the stages above; see the counts in the report")

    stages = {"train": train.stages}
    if valid is not None:
        stages["valid"] = valid.stages
    rejected = train.rejected + (valid.rejected if valid else [])
    report: dict[str, Any] = {
        "name": experiment.name,
        "sources": {"train": data.train, "valid": data.valid},
        "stages": stages,
        "cleaning": train.cleaning,
        "counts": {"train": len(train_examples), "valid": len(valid_examples), "rejected": len(rejected)},
        "tokens": {"train": reporting.token_stats(train_examples), "valid": reporting.token_stats(valid_examples)},
        "labels": {k: v for k, v in {"train": label_summary(train_examples), "valid": label_summary(valid_examples)}.items() if v},
        "problems": {
            "errors": sum(p.severity == "error" for p in everything),
            "warnings": sum(p.severity == "warning" for p in everything),
            "by_code": _by_code(everything),
            "first": [p.to_json() for p in everything[:50]],
        },
        "max_length": data.max_length,
        "overflow": data.overflow,
        "end_of_turn_token": preparer.encoder.end_of_turn,
        "seconds": {"read_clean_sample": round(read_done - started, 3), "tokenize": round(tokenized - read_done, 3)},
    }
    if retrieval is not None:
        report["rag"] = retrieval
    if experiment.train.backend == "local":
        report["local"] = reporting.local_plan(train_examples, experiment)
    else:
        report["openai"] = reporting.openai_estimate(train_examples, experiment)

    folder = run.sub("data")
    with atomic_dir(folder) as tmp:
        atomic_write_jsonl(tmp / "train.jsonl", (e.openai_record() for e in train_examples))
        atomic_write_jsonl(tmp / "valid.jsonl", (e.openai_record() for e in valid_examples))
        atomic_write_jsonl(tmp / "train.meta.jsonl", (e.meta_record() for e in train_examples))
        atomic_write_jsonl(tmp / "valid.meta.jsonl", (e.meta_record() for e in valid_examples))
        if rejected:
            atomic_write_jsonl(tmp / "rejected.jsonl", rejected)
        hashes = {name: file_sha256(tmp / name) for name in ("train.jsonl", "valid.jsonl")}
        report["sha256"] = hashes
        reporting.histogram(tmp / "token_lengths.png", {"train": [e.n_tokens for e in train_examples], "valid": [e.n_tokens for e in valid_examples]}, data.max_length)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", reporting.markdown(report))
    run.record("data", {"sha256": hashes, "counts": report["counts"], "sources": report["sources"]})
    return report


def _by_code(problems: list[Problem]) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(p.code for p in problems).most_common())
