"""Every shipped config prepares its data with the real SmolLM2 tokenizer, and the
messy review table's report matches an independent recount."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import pytest

from tuneforge.config import load_experiment
from tuneforge.data.prepare import prepare
from tuneforge.data.prepared import load_prepared
from tuneforge.models import load_tokenizer
from tuneforge.run import RunDir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.fixture(scope="module")
def tokenizer(smollm_location):
    from tuneforge.config import ModelSection

    return load_tokenizer(ModelSection(), smollm_location)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_prepares(path, tmp_path, tokenizer):
    experiment = load_experiment(path)
    # Configs for hub models (Llama, Qwen) cannot fetch their tokenizer here, so their
    # data section is exercised with the builtin one: same sources, mapping and checks.
    run = RunDir(experiment, tmp_path / "run").start("prepare")
    from tuneforge.rag.retriever import augment_examples

    report = prepare(
        experiment, run, tokenizer=tokenizer, progress=False, retrieve=augment_examples if experiment.data.rag else None
    )
    assert report["counts"]["train"] > 0 and report["counts"]["valid"] > 0
    assert report["problems"]["errors"] == 0
    assert report["tokens"]["train"]["missing_end_of_turn"] == 0
    assert report["end_of_turn_token"] == "<|im_end|>"
    assert ("local" in report) == (experiment.train.backend == "local")
    shape = {"input", "preferred_output", "non_preferred_output"} if experiment.train.method == "dpo" else {"messages"}
    for line in run.sub("data", "train.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == shape  # OpenAI's upload format as is (supervised, or preference pairs)


def test_review_table_report_matches_a_recount(tmp_path, tokenizer):
    """Recount the shipped messy CSV with the csv module and plain Python."""
    experiment = load_experiment(REPO / "configs" / "reviews-sentiment.yaml")
    run = RunDir(experiment, tmp_path / "run").start("prepare")
    report = prepare(experiment, run, tokenizer=tokenizer, progress=False)

    def tidy(cell: str) -> str:
        cell = html.unescape(cell).replace("\r\n", "\n")
        return re.sub(r"[ \t\u00a0]{2,}|\t", " ", cell).strip()

    with open(REPO / "examples/data/reviews/reviews.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    used = ["product", "title", "review", "sentiment"]
    rows = [{k: tidy(r[k]) for k in used} for r in rows]
    read = len(rows)
    no_review = [r for r in rows if not r["review"]]
    rows = [r for r in rows if r["review"]]
    no_sentiment = [r for r in rows if not r["sentiment"]]
    rows = [r for r in rows if r["sentiment"]]
    for r in rows:
        r["title"] = r["title"] or "(no title)"
    seen, unique = set(), []
    for r in rows:
        key = tuple(r.values())
        if key not in seen:
            seen.add(key)
            unique.append(r)

    stages = {s["stage"]: s for s in report["stages"]["train"]}
    assert stages["read"]["count"] == read == 600
    assert stages["empty review (dropped)"]["removed"] == len(no_review)
    assert stages["empty sentiment (dropped)"]["removed"] == len(no_sentiment)
    assert stages["exact duplicates"]["removed"] == len(rows) - len(unique)
    assert report["counts"]["train"] + report["counts"]["valid"] == len(unique)
    positives = sum(r["sentiment"] == "positive" for r in unique)
    labels = {split: summary["counts"] for split, summary in report["labels"].items()}
    assert labels["train"]["positive"] + labels["valid"]["positive"] == positives
    floor = report["labels"]["valid"]
    assert floor["majority_label"] == max(labels["valid"], key=labels["valid"].get)
    assert floor["majority_accuracy"] == round(max(labels["valid"].values()) / sum(labels["valid"].values()), 4)
    # the split is stratified: both splits hold about the same share of positives
    share = lambda counts: counts["positive"] / sum(counts.values())  # noqa: E731
    assert abs(share(labels["train"]) - share(labels["valid"])) < 0.05

    examples = load_prepared(run.sub("data"), "train") + load_prepared(run.sub("data"), "valid")
    text = " ".join(m["content"] for e in examples for m in e.messages)
    assert "&#039;" not in text and "&amp;" not in text and "&quot;" not in text
    assert all(e.label in ("positive", "negative") and e.messages[-1]["content"] == e.label for e in examples)
