"""`tuneforge eval` with the real builtin SmolLM2 on a handful of examples (no downloads)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tuneforge.config import load_experiment
from tuneforge.data.prepare import prepare
from tuneforge.eval.harness import run_eval
from tuneforge.models import load_tokenizer
from tuneforge.run import RunDir

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_generation_eval_with_a_local_judge(tmp_path, smollm_location, capsys):
    experiment = load_experiment(
        CONFIGS / "quickstart.yaml",
        [
            "data.rag=false",
            "eval.sample=3",
            "eval.systems=[base, ngram]",
            "eval.max_new_tokens=24",
            "eval.judge.model=base",
        ],
    )
    run = RunDir(experiment, tmp_path / "qs")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    assert run_eval(experiment, run, progress=False) == 0

    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    assert metrics["base"]["examples"] == 3
    assert math.isfinite(metrics["base"]["perplexity"]) and metrics["base"]["perplexity"] > 1
    pair = metrics["judge"]["pairs"][0]
    assert (pair["first"], pair["second"]) == ("base", "ngram")
    assert pair["wins"] + pair["ties"] + pair["losses"] == 3  # one verdict per example
    assert pair["win_rate"] == pytest.approx((pair["wins"] + 0.5 * pair["ties"]) / 3)
    with open(run.sub("eval", "predictions.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    answers = [row["answer"] for row in rows if row["system"] == "base"]
    assert len(answers) == 3 and all(answers)
    # the instruct model answers on topic: each answer is closer to its question (quality: their cosine, 0-100) than
    # the n-gram baseline's answer to it, which never reads the question (the base model scores 67-94 here, ngram 0-6)
    quality = {name: [float(r["quality"]) for r in rows if r["system"] == name] for name in ("base", "ngram")}
    assert all(b > n for b, n in zip(quality["base"], quality["ngram"])), quality
    assert metrics["base"]["quality"] == pytest.approx(sum(quality["base"]) / 3, abs=0.01)
    assert metrics["base"]["quality"] > 50
    assert "judge base: base vs ngram" in capsys.readouterr().out


def test_label_scoring_on_real_reviews_survives_truncation(tmp_path, smollm_location):
    experiment = load_experiment(
        CONFIGS / "reviews-sentiment.yaml", ["eval.sample=6", "eval.systems=[base, tfidf]", "eval.max_length=48"]
    )
    run = RunDir(experiment, tmp_path / "reviews")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    assert run_eval(experiment, run, progress=False) == 0  # reviews are cut to 48 tokens from the front, never an error

    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    with open(run.sub("eval", "predictions.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    for name in ("base", "tfidf", "majority"):
        mine = [r for r in rows if r["system"] == name]
        right = sum(r["predicted"] == r["label"] for r in mine)
        assert metrics[name]["examples"] == len(mine) == 6
        assert metrics[name]["accuracy"] == pytest.approx(right / 6)  # the accuracy of the predictions written
        assert sum(map(sum, metrics[name]["confusion"])) == 6
        assert sum(metrics[name]["confusion"][i][i] for i in range(2)) == right
    # both the model and the TF-IDF baseline beat always answering the training set's majority label (on these six:
    # base 5, tfidf 6, majority 2 right), so the label scores carry the reviews' sentiment even cut to 48 tokens
    assert metrics["base"]["accuracy"] > metrics["majority"]["accuracy"]
    assert metrics["tfidf"]["accuracy"] > metrics["majority"]["accuracy"]
    base = [r for r in rows if r["system"] == "base"]
    assert all(abs(float(r["p_negative"]) + float(r["p_positive"]) - 1) < 1e-3 for r in base)
    assert all(r["predicted"] == max(("negative", "positive"), key=lambda label: float(r[f"p_{label}"])) for r in base)
