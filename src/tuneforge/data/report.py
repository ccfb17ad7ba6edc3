"""The preparation report: counts per stage, token statistics, step and cost estimates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneforge.data.records import Example

if TYPE_CHECKING:
    from tuneforge.config import Experiment

# OpenAI's documented defaults for choosing n_epochs when it is "auto": aim at
# about 3 epochs, but at least 100 and at most 25,000 example passes in total.
OPENAI_TARGET_EPOCHS = 3
OPENAI_MIN_EXAMPLES = 100
OPENAI_MAX_EXAMPLES = 25_000
OPENAI_MAX_EPOCHS = 25


def token_stats(examples: list[Example]) -> dict[str, Any]:
    if not examples:
        return {"examples": 0}
    lengths = np.array([e.n_tokens for e in examples])
    trainable = int(sum(e.n_trainable for e in examples))
    total = int(sum(sum(n for n, _ in e.sequences) if e.sequences else e.n_tokens for e in examples))
    return {
        "examples": len(examples),
        "pairs": sum(e.rejected is not None for e in examples),  # preference pairs: both answers are counted
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "total": total,
        "trainable": trainable,
        "trainable_share": round(trainable / total, 4) if total else 0.0,
        "truncated": sum(e.truncated for e in examples),
        "missing_end_of_turn": sum(e.missing_eot for e in examples),
    }


def openai_epochs(n_examples: int) -> int:
    """The n_epochs OpenAI picks for `auto`."""
    epochs = OPENAI_TARGET_EPOCHS
    if n_examples * epochs < OPENAI_MIN_EXAMPLES:
        epochs = min(OPENAI_MAX_EPOCHS, math.ceil(OPENAI_MIN_EXAMPLES / max(n_examples, 1)))
    elif n_examples * epochs > OPENAI_MAX_EXAMPLES:
        epochs = max(1, OPENAI_MAX_EXAMPLES // n_examples)
    return epochs


def local_plan(train: list[Example], experiment: Experiment, has_valid: bool) -> dict[str, Any]:
    """The training plan the local trainer will follow on these examples (auto values resolved, with reasons)."""
    from tuneforge.data.plan import plan_grpo, plan_training

    if getattr(experiment.train, "method", "sft") == "grpo":  # prompts sampled afresh: no rows, no packing
        return plan_grpo(experiment.train, len(train), has_valid=has_valid).to_json()
    rows = _training_rows(train)
    plan = plan_training(
        experiment.train,
        [n for n, _ in rows],
        [t for _, t in rows],
        experiment.data.label is not None,
        experiment.data.max_length,
        experiment.seed,
        has_valid=has_valid,
    )
    return plan.to_json()


def _training_rows(train: list[Example]) -> list[tuple[int, int]]:
    """(tokens, trainable tokens) of each row training iterates: every sequence of an example, or a preference
    pair whole, as its two answers train side by side."""
    rows: list[tuple[int, int]] = []
    for example in train:
        if example.rejected is not None:
            rows.append((sum(n for n, _ in example.sequences), example.n_trainable))
        else:
            rows.extend(example.sequences or [(example.n_tokens, example.n_trainable)])
    return rows


def openai_estimate(train: list[Example], experiment: Experiment) -> dict[str, Any]:
    """Billed tokens and cost of the hosted job, counted with the hosted model's tiktoken encoding when it is at
    hand."""
    from tuneforge.data.openai_tokens import encoding_for, example_tokens

    t = experiment.train
    epochs = openai_epochs(len(train)) if t.epochs == "auto" else int(t.epochs)
    encoding, unavailable = encoding_for(t.model)
    if encoding is not None:
        tokens_per_epoch = sum(example_tokens(encoding, e.messages, e.extra.get("tools"), e.rejected) for e in train)
        note = f"tokens counted with {encoding.name} (tiktoken), the encoding {t.model} uses"
    else:
        tokens_per_epoch = sum(e.n_tokens for e in train)
        note = (
            f"tokens counted with the experiment model's tokenizer, as {unavailable}; "
            "OpenAI's own count differs by a few percent"
        )
    billed = tokens_per_epoch * epochs
    return {
        "model": t.model,
        "n_epochs": epochs,
        "n_epochs_source": "auto (OpenAI's rule)" if t.epochs == "auto" else "train.epochs",
        "tokens_per_epoch": tokens_per_epoch,
        "billed_tokens": billed,
        "price_per_1m_tokens": t.price_per_1m_tokens,
        "estimated_cost_usd": round(billed / 1e6 * t.price_per_1m_tokens, 4),
        "tokenizer": encoding.name if encoding is not None else "local",
        "note": note,
    }


def histogram(path: Path, lengths: dict[str, list[int]], max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    top = max([max(v) for v in lengths.values() if v] + [max_length])
    bins = np.linspace(0, top * 1.02, 40)
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.65, label=f"{name} ({len(values)})")
    ax.axvline(max_length, color="crimson", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data report: {report['name']}", ""]
    for section in (_stages_md, _cleaning_md, _tokens_md, _labels_md, _rag_md, _problems_md, _plan_md, _openai_md):
        lines += section(report)
    lines += ["", "![token lengths](token_lengths.png)", ""]
    return "\n".join(lines)


def _stages_md(report: dict[str, Any]) -> list[str]:
    lines = ["## Stages", "", "| split | stage | examples | removed |", "| --- | --- | ---: | ---: |"]
    for split_name, stages in report["stages"].items():
        for stage in stages:
            lines.append(f"| {split_name} | {stage['stage']} | {stage['count']} | {stage.get('removed', '')} |")
    return lines


def _cleaning_md(report: dict[str, Any]) -> list[str]:
    cleaning = report.get("cleaning")
    if not cleaning:
        return []
    return ["", "## Cleaning", "", *(f"- {key.replace('_', ' ')}: {value}" for key, value in cleaning.items())]


def _tokens_md(report: dict[str, Any]) -> list[str]:
    lines = []
    pairs = any(s.get("pairs") for s in report["tokens"].values())
    if pairs:
        lines += [
            "",
            "Preference pairs: the lengths are of the longer side (prompt + answer); the trainable share counts both "
            "answers.",
        ]
    lines += [
        "",
        "## Tokens per " + ("pair" if pairs else "example"),
        "",
        "| split | examples | min | median | p95 | max | trainable share | truncated | no end-of-turn |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split_name, s in report["tokens"].items():
        if s.get("examples"):
            lines.append(
                f"| {split_name} | {s['examples']} | {s['min']} | {s['median']:.0f} | {s['p95']:.0f} | {s['max']} | "
                f"{s['trainable_share']:.1%} | {s['truncated']} | {s['missing_end_of_turn']} |"
            )
    return lines


def _labels_md(report: dict[str, Any]) -> list[str]:
    if not report.get("labels"):
        return []
    labels = _all_labels(report["labels"])
    lines = [
        "",
        "## Labels",
        "",
        "Always answering the most common label is the floor a classifier has to beat.",
        "",
        "| split | " + " | ".join(labels) + " | majority-class accuracy |",
        "| --- |" + " ---: |" * (len(labels) + 1),
    ]
    for split_name, summary_ in report["labels"].items():
        counts = summary_["counts"]
        total = sum(counts.values())
        cells = [f"{counts.get(k, 0)} ({counts.get(k, 0) / total:.0%})" for k in labels]
        majority = f"{summary_['majority_accuracy']:.3f} ({summary_['majority_label']})"
        lines.append(f"| {split_name} | " + " | ".join(cells) + f" | {majority} |")
    return lines


def _rag_md(report: dict[str, Any]) -> list[str]:
    rag = report.get("rag")
    if not rag:
        return []
    lines = [
        "",
        "## Retrieval-augmented examples (data.rag)",
        "",
        f"{rag['augmented']} examples carry the top {rag['k']} passages from {rag['corpus']} in their last user turn; "
        f"{rag['no_passages']} got none.",
        "",
    ]
    return lines + [f"- {source}: retrieved {n} times" for source, n in rag["most_retrieved"].items()]


def _problems_md(report: dict[str, Any]) -> list[str]:
    problems = report["problems"]
    lines = ["", "## Problems", "", f"{problems['errors']} errors, {problems['warnings']} warnings"]
    return lines + [f"- `{code}`: {n}" for code, n in problems["by_code"].items()]


def _plan_md(report: dict[str, Any]) -> list[str]:
    if "local" not in report:
        return []
    from tuneforge.data.plan import TrainingPlan

    plan = TrainingPlan(**report["local"])
    lines = [
        "",
        "## Training plan (local)",
        "",
        "Values marked auto in the experiment file were chosen from this data:",
        "",
    ]
    lines += [f"- {line}" for line in plan.describe()]
    return lines + [f"- **warning:** {w}" for w in plan.warnings]


def _openai_md(report: dict[str, Any]) -> list[str]:
    if "openai" not in report:
        return []
    oa = report["openai"]
    return [
        "",
        "## OpenAI fine-tuning estimate",
        "",
        f"- model: {oa['model']}",
        f"- n_epochs: {oa['n_epochs']} ({oa['n_epochs_source']})",
        f"- billed tokens: {oa['billed_tokens']:,}",
        f"- estimated cost: ${oa['estimated_cost_usd']:.2f} at ${oa['price_per_1m_tokens']}/1M tokens",
        f"- {oa['note']}",
    ]


def _all_labels(labels: dict[str, Any]) -> list[str]:
    return sorted({k for summary_ in labels.values() for k in summary_["counts"]})


def summary(report: dict[str, Any]) -> str:
    """The few lines printed at the end of `tuneforge prepare`."""
    tok = report["tokens"]["train"]
    unit = "preference pairs" if tok.get("pairs") else "examples"
    out = [f"train {report['counts']['train']} {unit}, valid {report['counts']['valid']}"]
    for name, note in (report.get("cleaning") or {}).get("encoding", {}).items():
        if not note.startswith(("utf-8 ", "utf-8-sig ")):  # say so whenever a file was not read as UTF-8
            out.append(f"{name} read as {note}; set data.encoding to override")
    if tok.get("examples"):
        per = "pair (longer answer)" if tok.get("pairs") else "example"
        out.append(
            f"tokens/{per}: min {tok['min']}, median {tok['median']:.0f}, p95 {tok['p95']:.0f}, max {tok['max']}; "
            f"trainable share {tok['trainable_share']:.1%}; truncated {tok['truncated']}; "
            f"no end-of-turn {tok['missing_end_of_turn']}"
        )
    problems = report["problems"]
    rejected = report["counts"]["rejected"]
    out.append(f"problems: {problems['errors']} errors, {problems['warnings']} warnings, {rejected} rejected")
    if report.get("labels"):
        floor = report["labels"].get("valid") or report["labels"]["train"]
        majority = f"{floor['majority_accuracy']:.3f} (always {floor['majority_label']!r})"
        out.append(f"majority-class accuracy {majority}: the floor to beat")
    if "local" in report:
        plan = report["local"]
        out.append(
            f"local training plan: {plan['steps']} optimizer steps ({plan['epochs']:g} epochs, "
            f"batch {plan['batch_size']}, lr {plan['lr']:g}, packing {'on' if plan['packing'] else 'off'})"
        )
        out += [f"warning: {w}" for w in plan["warnings"]]
    if "openai" in report:
        oa = report["openai"]
        cost = f"about ${oa['estimated_cost_usd']:.2f}"
        out.append(f"openai: {oa['n_epochs']} epochs, {oa['billed_tokens']:,} billed tokens, {cost}")
    return "\n".join(out)
