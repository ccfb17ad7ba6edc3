"""Metrics tables, predictions.csv, metrics.json, report.md and report.html (charts embedded) for one eval."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuneforge.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from tuneforge.eval import scores

if TYPE_CHECKING:
    from tuneforge.config import Experiment

SIDE_BY_SIDE = 3  # examples shown answer by answer in the report
HEADLINE = {
    True: ("accuracy", "macro_f1", "roc_auc"),
    False: ("similarity", "quality", "answering", "rouge_l", "bleu", "perplexity", "tool_function", "tool_call"),
}


def classification_metrics(items, labels: list[str], outcomes, seed: int) -> tuple[dict, dict]:
    truth = [item.label for item in items]
    table, per_example = {}, {}
    for outcome in outcomes:
        predicted = [a if a in labels else (scores.map_to_label(a, labels) or "(none)") for a in outcome.answers]
        metrics = scores.classification(truth, predicted, outcome.probabilities, labels)
        correct = np.array([p == t for p, t in zip(predicted, truth)], dtype=float)
        metrics["accuracy_low"], metrics["accuracy_high"] = scores.bootstrap_interval(correct, seed)
        table[outcome.name] = {"examples": len(items), **metrics, "seconds": outcome.seconds}
        per_example[outcome.name] = [
            {"predicted": p, "correct": bool(c), **{f"p_{label}": round(float(q), 6) for label, q in zip(labels, row)}}
            for p, c, row in zip(predicted, correct, outcome.probabilities)
        ]
    return table, per_example


def generation_metrics(items, outcomes, seed: int, embedder_ref: str) -> tuple[dict, dict]:
    from tuneforge.rag.store import Embedder

    embedder = Embedder(embedder_ref)
    references = [item.reference or "" for item in items]
    question_vectors = embedder.encode([item.question for item in items])
    reference_vectors = embedder.encode(references)
    table, per_example = {}, {}
    for outcome in outcomes:
        answer_vectors = embedder.encode(outcome.answers)
        similarity = scores.cosine_rows(answer_vectors, reference_vectors)
        quality = scores.quality_score(scores.cosine_rows(answer_vectors, question_vectors))
        answering = scores.answering_score(answer_vectors, reference_vectors, question_vectors)
        overlap = scores.rouge_bleu(outcome.answers, references)
        metrics = {
            "examples": len(items),
            "similarity": float(similarity.mean()),
            "quality": float(quality.mean()),
            "answering": float(answering.mean()),
            "rouge_l": overlap["rouge_l"],
            "bleu": overlap["bleu"],
        }
        metrics["similarity_low"], metrics["similarity_high"] = scores.bootstrap_interval(similarity, seed)
        metrics["quality_low"], metrics["quality_high"] = scores.bootstrap_interval(quality, seed)
        metrics["answering_low"], metrics["answering_high"] = scores.bootstrap_interval(answering, seed)
        each_ppl = [None] * len(items)
        if outcome.reference_logprob is not None:
            metrics["perplexity"] = scores.perplexity(sum(outcome.reference_logprob), sum(outcome.reference_tokens))
            each_ppl = [scores.perplexity(lp, n) for lp, n in zip(outcome.reference_logprob, outcome.reference_tokens)]
        calls = tool_call_scores(items, outcome)
        if calls is not None:
            metrics["tool_function"], metrics["tool_call"] = calls["function"], calls["call"]
        metrics["seconds"] = outcome.seconds
        table[outcome.name] = metrics
        per_example[outcome.name] = [
            {
                "similarity": round(float(s), 4),
                "quality": round(float(q), 2),
                "answering": round(float(a), 4),
                "rouge_l": round(r, 4),
                "bleu": round(b, 2),
                "perplexity": None if p is None else round(p, 3),
                **({"tool_call": c} if c is not None else {}),
            }
            for s, q, a, r, b, p, c in zip(
                similarity,
                quality,
                answering,
                overlap["rouge_l_each"],
                overlap["bleu_each"],
                each_ppl,
                calls["each"] if calls else [None] * len(items),
            )
        ]
    return table, per_example


def grader_metrics(graders, items, outcomes, table: dict, per_example: dict, models, seed: int, progress: bool) -> None:
    """Each grader's reward (`graders`: validated, harness.check_graders) on every answer of every system, into the
    table (`grader_<name>`: the mean with its 95% bootstrap interval, `grader_<name>_errors`: the answers it failed
    on, scored 0 as OpenAI does) and per example."""
    from tqdm.auto import tqdm

    from tuneforge.graders import grade

    with tqdm(total=len(graders) * len(outcomes) * len(items), desc="grading", disable=not progress) as bar:
        for grader in graders:
            column = f"grader_{grader.name}"
            for outcome in outcomes:
                results = []
                for item, answer in zip(items, outcome.answers):
                    results.append(grade(grader, {"output_text": answer}, item.fields, model=models))
                    bar.update(1)
                rewards = np.array([r.score for r in results], dtype=float)
                metrics = table[outcome.name]
                metrics[column] = float(rewards.mean())
                metrics[f"{column}_low"], metrics[f"{column}_high"] = scores.bootstrap_interval(rewards, seed)
                metrics[f"{column}_errors"] = sum(r.error is not None for r in results)
                for row, reward in zip(per_example[outcome.name], rewards):
                    row[column] = round(float(reward), 4)


def grader_columns(table: dict) -> list[str]:
    """The `grader_<name>` means of eval.graders, in the order they were scored."""
    first = next(iter(table.values()), {})
    return [k for k in first if k.startswith("grader_") and not k.endswith(("_low", "_high", "_errors"))]


def tool_call_scores(items, outcome) -> dict | None:
    """On the items whose reference calls tools: the share where the system called the same functions
    (`function`), and the share where it also gave arguments equal as JSON (`call`). Per item: "right",
    "wrong arguments", "wrong function" or "no call"."""
    from tuneforge.data.tools import same_call

    scored = [i for i, item in enumerate(items) if getattr(item, "reference_calls", None)]
    if not scored:
        return None
    each: list[str | None] = [None] * len(items)
    for i in scored:
        made = (outcome.tool_calls[i] if i < len(outcome.tool_calls) else None) or []
        wanted = items[i].reference_calls
        if not made:
            each[i] = "no call"
            continue
        matches = [same_call(a, b) for a, b in zip(made, wanted)] if len(made) == len(wanted) else [(False, False)]
        each[i] = (
            "right"
            if all(m[1] for m in matches)
            else "wrong arguments"
            if all(m[0] for m in matches)
            else "wrong function"
        )
    n = len(scored)
    return {
        "function": sum(each[i] in ("right", "wrong arguments") for i in scored) / n,
        "call": sum(each[i] == "right" for i in scored) / n,
        "each": each,
    }


def summary_table(table: dict, classification: bool) -> str:
    columns = [c for c in HEADLINE[classification] if any(table[s].get(c) is not None for s in table)]
    columns += grader_columns(table)
    width = max(len("system"), *(len(s) for s in table))
    lines = [f"{'system':<{width}}  " + "  ".join(f"{c:>10}" for c in columns) + f"  {'seconds':>8}"]
    for system, metrics in table.items():
        lines.append(
            f"{system:<{width}}  "
            + "  ".join(f"{_fmt(metrics.get(c)):>10}" for c in columns)
            + f"  {metrics['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def write(
    folder: Path, items, labels, outcomes, table: dict, per_example: dict, judged: dict | None, experiment: Experiment
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    classification = labels is not None
    atomic_write_text(folder / "predictions.csv", _predictions_csv(items, outcomes, per_example))
    metrics = {name: {k: v for k, v in values.items()} for name, values in table.items()}
    if judged:
        metrics["judge"] = judged
    atomic_write_json(folder / "metrics.json", metrics)
    charts = {"metrics.png": _bars(table, classification)}
    if classification:
        charts["confusion.png"] = _confusions(table, labels)
    if judged:
        charts["judge.png"] = _judge_bars(judged)
    for name, png in charts.items():
        atomic_write_bytes(folder / name, png)
    atomic_write_text(
        folder / "report.md", _markdown(experiment, items, outcomes, table, judged, charts, classification)
    )
    atomic_write_text(folder / "report.html", _html(experiment, items, outcomes, table, judged, charts, classification))
    return folder


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _predictions_csv(items, outcomes, per_example: dict) -> str:
    score_columns = sorted({k for rows in per_example.values() for row in rows for k in row})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "system", "prompt", "answer", "reference", "label", "sources", *score_columns])
    for outcome in outcomes:
        for item, answer, sources, row in zip(items, outcome.answers, outcome.sources, per_example[outcome.name]):
            cited = "; ".join(f"{h['source']} ({h['score']:.3f})" for h in sources)
            writer.writerow(
                [
                    item.id,
                    outcome.name,
                    json.dumps(item.prompt, ensure_ascii=False),
                    answer,
                    item.reference or "",
                    item.label or "",
                    cited,
                    *(_fmt(row.get(c)) if isinstance(row.get(c), float) else row.get(c, "") for c in score_columns),
                ]
            )
    return out.getvalue()


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(table: dict, classification: bool) -> bytes:
    plt = _plt()
    panels = ["accuracy"] if classification else ["similarity", "quality", "answering"]
    panels = [p for p in panels if p in next(iter(table.values()))] + grader_columns(table)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    names = list(table)
    for ax, metric in zip(axes[0], panels):
        values = np.array([table[n][metric] for n in names])
        low = values - np.array([table[n][f"{metric}_low"] for n in names])
        high = np.array([table[n][f"{metric}_high"] for n in names]) - values
        ax.bar(names, values, yerr=[low, high], capsize=4, color="#4c78a8")
        ax.set_title(f"{metric} (95% bootstrap CI)")
        ax.tick_params(axis="x", rotation=20)
    return _figure_png(figure)


def _confusions(table: dict, labels: list[str]) -> bytes:
    plt = _plt()
    figure, axes = plt.subplots(
        1, len(table), figsize=(3.0 * len(table) + 1.0, 3.4), squeeze=False, sharey=True, layout="constrained"
    )
    for column, (ax, (name, metrics)) in enumerate(zip(axes[0], table.items())):
        matrix = np.array(metrics["confusion"])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        dark = matrix.max() * 0.6
        for (r, c), count in np.ndenumerate(matrix):
            ax.text(c, r, str(count), ha="center", va="center", color="white" if count > dark else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        if column == 0:  # the rows are the same true labels in every panel
            ax.set_ylabel("true")
        ax.set_title(name)
    return _figure_png(figure)


def _judge_bars(judged: dict) -> bytes:
    plt = _plt()
    pairs = judged["pairs"]
    figure, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(pairs)), 3.2))
    names = [f"{p['first']}\nvs {p['second']}" for p in pairs]
    rates = np.array([p["win_rate"] for p in pairs])
    ax.bar(
        names,
        rates,
        yerr=[rates - [p["win_rate_low"] for p in pairs], np.array([p["win_rate_high"] for p in pairs]) - rates],
        capsize=4,
        color="#f58518",
    )
    ax.axhline(0.5, color="grey", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_title(f"win rate of the first system, judge {judged['model']}")
    return _figure_png(figure)


def _table_rows(table: dict, classification: bool) -> tuple[list[str], list[list[str]]]:
    columns = [
        c
        for c in (*HEADLINE[classification], *grader_columns(table), "precision", "recall", "examples", "seconds")
        if any(table[s].get(c) is not None for s in table)
    ]
    rows = []
    for system, metrics in table.items():
        row = [system]
        for c in columns:
            value = _fmt(metrics.get(c))
            if f"{c}_low" in metrics:
                value += f" [{_fmt(metrics[f'{c}_low'])}, {_fmt(metrics[f'{c}_high'])}]"
            row.append(value)
        rows.append(row)
    return ["system", *columns], rows


GRADER_NOTE = (
    " grader_<name>: the mean reward of that eval.graders grader over the answers (0 where it failed on one, as "
    "OpenAI scores it; metrics.json counts the failures in grader_<name>_errors)."
)


def _explanation(classification: bool, graded: bool = False) -> str:
    return _metric_explanation(classification) + (GRADER_NOTE if graded else "")


def _metric_explanation(classification: bool) -> str:
    if classification:
        return (
            "Local systems answer with the label of highest likelihood given the prompt; "
            "hosted ones answer and the answer is read as a label. Brackets: 95% bootstrap interval. "
            "ROC-AUC uses the label probabilities (one-vs-rest for more than two labels)."
        )
    return (
        "similarity: cosine of the answer's and the reference's embeddings. "
        "quality: the answer's cosine with the question, on 0-100: it measures whether the answer stays on the "
        "question's topic, not whether it answers it; repeating the question scores 100, more than the reference "
        "answer does, so a system that echoes the question ranks high on it. "
        "answering: cosine of the answer with what the reference says beyond the question (the reference's "
        "embedding less its part along the question): 0 for repeating the question or an unrelated answer, at most "
        "sqrt(1 - c^2) for the reference itself (c: its cosine with the question); restating the question on the "
        "way neither adds nor takes off. None of the three checks facts: a wrong figure in a fitting sentence "
        "scores about as well as the right one. "
        "ROUGE-L and BLEU against the reference; perplexity: of the reference answer under the system, per token "
        "(per word for ngram, so not comparable with the models). Brackets: 95% bootstrap interval."
    )


def _judge_lines(judged: dict) -> list[list[str]]:
    return [
        [
            p["first"],
            p["second"],
            str(p["wins"]),
            str(p["ties"]),
            str(p["losses"]),
            f"{p['win_rate']:.2f} [{p['win_rate_low']:.2f}, {p['win_rate_high']:.2f}]",
            agreement_text(p),
        ]
        for p in judged["pairs"]
    ]


def agreement_text(pair: dict) -> str:
    """'similarity 0.62, quality 0.40, answering 0.71': how often each score backs the judge's winner."""
    found = pair.get("agreement") or {}
    return ", ".join(f"{metric} {_fmt(share) if share is None else f'{share:.2f}'}" for metric, share in found.items())


JUDGE_HEADER = ["system", "vs", "wins", "ties", "losses", "win rate [95% CI]", "scores that back its winner"]
JUDGE_NOTE = (
    "Each pair asked in both orders; a split verdict is a tie. Scores that back its winner: of the examples the judge "
    "decided, the share where each judge-free score is higher for the judge's winner (a level score counts half)."
)


def _markdown(experiment: Experiment, items, outcomes, table, judged, charts, classification) -> str:
    header, rows = _table_rows(table, classification)
    lines = [
        f"# Eval: {experiment.name}",
        "",
        f"{len(items)} examples, {'classification' if classification else 'generation'}.",
        "",
        _explanation(classification, bool(grader_columns(table))),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *(f"![{name}]({name})" for name in charts), ""]
    if judged:
        lines += [
            f"## Judge: {judged['model']}",
            "",
            f"Rubric: {judged['rubric']}",
            "",
            JUDGE_NOTE,
            "",
            "| " + " | ".join(JUDGE_HEADER) + " |",
            "|" + "---|" * len(JUDGE_HEADER),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in _judge_lines(judged)] + [""]
    lines += ["## Examples", ""]
    for index, item in enumerate(items[:SIDE_BY_SIDE]):
        lines += [
            f"### {item.id}",
            "",
            f"**Question:** {_one_line(item.question)}",
            "",
            f"**Reference:** {_one_line(item.reference or item.label or '')}",
            "",
        ]
        lines += [f"- **{o.name}:** {_one_line(o.answers[index])}" for o in outcomes] + [""]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _html(experiment: Experiment, items, outcomes, table, judged, charts, classification) -> str:
    esc = html.escape
    header, rows = _table_rows(table, classification)

    def grid(head, body):
        return (
            "<table><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
            + "</table>"
        )

    parts = [
        f"<h1>Eval: {esc(experiment.name)}</h1>",
        f"<p>{len(items)} examples, {'classification' if classification else 'generation'}.</p>",
        f"<p>{esc(_explanation(classification, bool(grader_columns(table))))}</p>",
        grid(header, rows),
    ]
    parts += [
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in charts.items()
    ]
    if judged:
        parts += [
            f"<h2>Judge: {esc(judged['model'])}</h2>",
            f"<p>Rubric: {esc(judged['rubric'])}. {esc(JUDGE_NOTE)}</p>",
            grid(JUDGE_HEADER, _judge_lines(judged)),
        ]
    parts.append("<h2>Examples</h2>")
    for index, item in enumerate(items[:SIDE_BY_SIDE]):
        parts.append(
            f"<h3>{esc(item.id)}</h3><p><b>Question:</b> {esc(item.question)}</p>"
            f"<p><b>Reference:</b> {esc(item.reference or item.label or '')}</p>"
        )
        parts.append(grid([o.name for o in outcomes], [[o.answers[index] for o in outcomes]]))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{max-width:100%;margin:0.5em 0}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Eval: {esc(experiment.name)}</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
