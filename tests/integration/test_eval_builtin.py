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
    experiment = load_experiment(CONFIGS / "quickstart.yaml", ["data.rag=false", "eval.sample=3", "eval.systems=[base, ngram]", "eval.max_new_tokens=24",
                                                               "eval.judge.model=base"])
    run = RunDir(experiment, tmp_path / "qs")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    assert run_eval(experiment, run, progress=False) == 0

    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    assert metrics["base"]["examples"] == 3
    assert math.isfinite(metrics["base"]["perplexity"]) and metrics["base"]["perplexity"] > 1
    assert 0 < metrics["base"]["quality"] <= 100  # the instruct model answers on topic
    pair = metrics["judge"]["pairs"][0]
    assert (pair["first"], pair["second"]) == ("base", "ngram")
    with open(run.sub("eval", "predictions.csv"), newline="") as fh:
        answers = [row["answer"] for row in csv.DictReader(fh) if row["system"] == "base"]
    assert len(answers) == 3 and all(answers)
    assert "judge base: base vs ngram" in capsys.readouterr().out


def test_label_scoring_on_real_reviews_survives_truncation(tmp_path, smollm_location):
    experiment = load_experiment(CONFIGS / "reviews-sentiment.yaml", ["eval.sample=6", "eval.systems=[base, tfidf]", "eval.max_length=48"])
    run = RunDir(experiment, tmp_path / "reviews")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    assert run_eval(experiment, run, progress=False) == 0  # reviews are cut to 48 tokens from the front, never an error

    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    for name in ("base", "tfidf"):
        assert metrics[name]["examples"] == 6 and 0 <= metrics[name]["accuracy"] <= 1
        assert sum(map(sum, metrics[name]["confusion"])) == 6
    with open(run.sub("eval", "predictions.csv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["system"] == "base"]
    assert all(abs(float(r["p_negative"]) + float(r["p_positive"]) - 1) < 1e-3 for r in rows)
