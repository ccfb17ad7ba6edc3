"""Sweeps without a model: drawing points, naming them, refusing bad sections, the median stopping rule, the shared
answer cache, and `compare` over run folders written by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tuneforge.compare import compare_runs, differing, load_runs
from tuneforge.config import load_experiment
from tuneforge.errors import ConfigError
from tuneforge.eval.cache import Cache
from tuneforge.sweep import draw, finished_curves, metric_of, plan, prepare_key, slug

BASE = """name: s
seed: 4
data:
  train: reviews.csv
  template: {user: "Review: {review}", assistant: "{sentiment}"}
  label: sentiment
"""


def _file(tmp_path, sweep: str, base: str = BASE):
    path = tmp_path / "exp.yaml"
    path.write_text(base + sweep)
    return path


def test_a_grid_is_every_combination_each_a_plain_run_with_its_values(tmp_path):
    path = _file(
        tmp_path, "sweep:\n  params: {train.lr: [1.0e-4, 2.0e-4], lora.r: [8, 16], data.train: [a.csv, b/c.csv]}\n"
    )
    points = plan(load_experiment(path))
    assert len(points) == 8
    assert {(p.experiment.train.lr, p.experiment.lora.r, p.experiment.data.train) for p in points} == {
        (lr, r, d) for lr in (1e-4, 2e-4) for r in (8, 16) for d in ("a.csv", "b/c.csv")
    }
    assert all(p.experiment.sweep is None for p in points)  # each point is a normal run
    assert points[0].slug == "lr=0.0001-r=8-train=a"
    assert len({p.slug for p in points}) == 8
    # points with the same data share one preparation; another data file is another
    assert len({prepare_key(p.experiment) for p in points}) == 2


def test_random_draws_without_repeats_from_the_seed_and_ranges_stay_inside(tmp_path):
    path = _file(
        tmp_path,
        "sweep:\n  random: 5\n  params: {train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}, lora.r: [4, 8, 16]}\n",
    )
    experiment = load_experiment(path)
    first, again = draw(experiment.sweep, 4), draw(experiment.sweep, 4)
    assert first == again and len(first) == 5
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 5
    assert all(1e-5 <= p["train.lr"] <= 1e-3 and p["lora.r"] in (4, 8, 16) for p in first)
    assert draw(experiment.sweep, 5) != first
    lists = load_experiment(_file(tmp_path, "sweep:\n  random: 10\n  params: {lora.r: [4, 8, 16]}\n")).sweep
    assert sorted(p["lora.r"] for p in draw(lists, 1)) == [4, 8, 16]  # at most the whole grid, none twice


def test_slugs_name_the_whole_key_when_two_share_a_last_part_and_never_collide():
    taken: set[str] = set()
    assert slug({"data.train": "x.jsonl", "train.epochs": 2}, taken) == "train=x-epochs=2"
    assert slug({"train.dpo.beta": 0.1, "lora.dropout": 0.0}, taken) == "beta=0.1-dropout=0"
    assert slug({"data.max_length": 1, "train.max_length": 2}, taken) == "data.max_length=1-train.max_length=2"
    assert slug({"data.train": "x.jsonl", "train.epochs": 2}, taken) == "train=x-epochs=2-2"


@pytest.mark.parametrize(
    "sweep, words",
    [
        (
            "  params: {train.lrr: [1, 2]}\n",
            ["1 problem", "line 8: sweep.params train.lrr: unknown key in train", "did you mean 'lr'"],
        ),
        ("  params: {lora.r: []}\n", ["sweep.params", "lora.r: empty list"]),
        ("  params: {lora.r: [8, 0]}\n", ["line 8: sweep.params lora.r: got 0", "greater than 0"]),
        ("  params: {lora.r: [8]}\n  metric: rouge_l\n", ["sweep.metric", "'rouge_l'", "classification", "accuracy"]),
        (
            "  params: {lora.r: [8]}\n  metric: finetuned+rag.accuracy\n",
            ["sweep.metric", "finetuned+rag", "not in eval.systems"],
        ),
        ("  params: {lora.r: {low: 4, high: 8}}\n", ["ranges", "random: N"]),
        ("  params: {name: [a, b]}\n", ["name: cannot be swept"]),
        ("  params: {}\n", ["at least one key"]),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(tmp_path, sweep, words):
    path = _file(tmp_path, "sweep:\n" + sweep)
    with pytest.raises(ConfigError) as caught:
        plan(load_experiment(path))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_the_cli_refuses_a_bad_sweep_before_anything_is_written(tmp_path):
    path = _file(tmp_path, "sweep:\n  params: {train.lrr: [1.0e-4, 2.0e-4]}\n")
    (tmp_path / "reviews.csv").write_text("review,sentiment\ngood,positive\n")
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "sweep", str(path)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 2 and "train.lrr" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml", "reviews.csv"]
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "sweep", str(_file(tmp_path, "", BASE))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "no sweep section" in out.stderr


def test_the_metric_defaults_to_accuracy_or_similarity_and_perplexity_is_minimised(tmp_path):
    labelled = load_experiment(_file(tmp_path, "sweep: {params: {lora.r: [8]}}\n"))
    assert metric_of(labelled) == ("finetuned", "accuracy", "max")
    chats = load_experiment(
        _file(
            tmp_path, "sweep: {params: {lora.r: [8]}, metric: base.perplexity}\n", "name: c\ndata: {train: c.jsonl}\n"
        )
    )
    assert metric_of(chats) == ("base", "perplexity", "min")


def _finished(root, name, curve, status="done"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "point.json").write_text(json.dumps({"status": status}))
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in curve) + "\n")


def _evaluate(stopper, epoch, value):
    control = SimpleNamespace(should_training_stop=False)
    stopper.on_evaluate(None, SimpleNamespace(epoch=epoch), control, metrics={"eval_accuracy": value})
    return control.should_training_stop


def test_median_rule_stops_a_point_clearly_behind_finished_ones_at_the_same_epoch(tmp_path):
    from tuneforge.train.callbacks import MedianStop

    for name, values in (("a", [0.6, 0.8, 0.9]), ("b", [0.5, 0.7, 0.85]), ("c", [0.4, 0.6, 0.8])):
        _finished(
            tmp_path,
            name,
            [{"step": 0, "epoch": 0.0, "eval_accuracy": 0.3}]
            + [{"step": i + 1, "epoch": (i + 1) / 3, "eval_accuracy": v} for i, v in enumerate(values)],
        )
    behind = MedianStop(lambda: finished_curves(tmp_path, "me"), labelled=True, margin=0.02)
    assert not _evaluate(behind, 0.0, 0.3)  # the base model's evaluation does not count
    assert not _evaluate(behind, 1 / 3, 0.3)  # never on the first evaluation
    assert _evaluate(behind, 2 / 3, 0.6)  # best 0.6 vs median 0.7 at this epoch
    assert "median 0.7000 of 3 finished points" in behind.reason
    close = MedianStop(lambda: finished_curves(tmp_path, "me"), labelled=True, margin=0.02)
    assert not _evaluate(close, 1 / 3, 0.5) and not _evaluate(close, 2 / 3, 0.69)  # within the margin
    # no finished peers: nothing to compare with
    alone = MedianStop(lambda: finished_curves(tmp_path / "a", "me"), labelled=True, margin=0.02)
    (tmp_path / "a" / "x").mkdir()
    assert not _evaluate(alone, 1 / 3, 0.1) and not _evaluate(alone, 2 / 3, 0.1)


def test_points_writing_one_answer_cache_at_once_keep_each_others_entries(tmp_path):
    first, second = Cache(tmp_path, "base"), Cache(tmp_path, "base")  # both read the empty cache
    first.put("a", {"text": "1"})
    second.put("b", {"text": "2"})
    first.save()
    second.save()
    assert set(Cache(tmp_path, "base").entries) == {"a", "b"}


def _run(root, name, lr, accuracy, loss, eval_set="e1", judge=None, source=None, backend="local", tokens=None):
    folder = root / name
    (folder / "eval").mkdir(parents=True)
    config = {
        "name": "s",
        "seed": 1,
        "data": {"train": "reviews.csv", "label": "sentiment"},
        "train": {"backend": backend, "lr": lr, "price_per_1m_tokens": 3.0},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = {
        "source": source,
        "eval": {"mode": "classification", "eval_set": eval_set},
        "train": {"steps": 10, "seconds": 12.5, "supervised_tokens": 400, "final_eval_loss": loss},
    }
    if tokens:
        manifest["openai_job"] = {"trained_tokens": tokens}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"step": 0, "epoch": 0.0, "eval_loss": 3.0, "eval_accuracy": 0.5},
                {"step": 5, "epoch": 0.5, "loss": 2.0},
                {"step": 10, "epoch": 1.0, "loss": 1.5, "eval_loss": loss, "eval_accuracy": accuracy},
            )
        )
        + "\n"
    )
    metrics = {
        "base": {"accuracy": 0.5, "accuracy_low": 0.3, "accuracy_high": 0.7, "seconds": 1.0},
        "finetuned": {
            "accuracy": accuracy,
            "accuracy_low": accuracy - 0.1,
            "accuracy_high": accuracy + 0.1,
            "seconds": 2.0,
        },
    }
    if judge:
        metrics["judge"] = {"pairs": [judge]}
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_lists_differences_ranks_with_ties_to_the_lower_loss_and_writes_a_reusable_best(tmp_path):
    (tmp_path / "reviews.csv").write_text("review,sentiment\n")
    source = str(tmp_path / "exp.yaml")
    runs = [
        _run(tmp_path, "a", 1e-4, 0.8, 1.2, source=source),
        _run(tmp_path, "b", 2e-4, 0.8, 1.1, source=source),
        _run(tmp_path, "c", 3e-4, 0.7, 0.9, source=source),
    ]
    out = tmp_path / "report"
    compare_runs(runs, out)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["differing"] == ["train.lr"] and summary["metric"] == "finetuned.accuracy"
    assert summary["best"]["run"] == "b"  # ties with a on accuracy, lower final valid loss
    assert [r["interval"] for r in summary["runs"]][0] == pytest.approx([0.7, 0.9])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == 2e-4 and best["data"]["train"] == str(tmp_path / "reviews.csv")
    text = (out / "compare.md").read_text()
    assert "| b (best) |" in text and "all 3 runs | base" in text
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and (out / "metrics.png").exists()
    assert "<img" in (out / "compare.html").read_text()
    compare_runs(runs, tmp_path / "low", metric="finetuned.accuracy", goal="min")
    low = json.loads((tmp_path / "low" / "compare.json").read_text())
    assert low["best"]["run"] == "c"


def test_compare_flags_other_eval_sets_shows_judge_verdicts_and_hosted_cost(tmp_path):
    pair = {
        "first": "base",
        "second": "finetuned",
        "wins": 3,
        "ties": 1,
        "losses": 6,
        "win_rate": 0.35,
        "win_rate_low": 0.15,
        "win_rate_high": 0.6,
    }
    runs = [
        _run(tmp_path, "local", 1e-4, 0.8, 1.2, judge=pair),
        _run(tmp_path, "hosted", 1e-4, 0.9, 1.0, eval_set="e2", backend="openai", tokens=200_000),
    ]
    compare_runs(runs, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert summary["eval_sets"] == 2 and summary["differing"] == ["train.backend"]
    hosted = next(r for r in summary["runs"] if r["run"] == "hosted")
    assert hosted["training"]["hosted_usd"] == pytest.approx(0.6)
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "2 different eval sets" in text and "base vs finetuned" in text and "0.35" in text
    assert "all 2 runs" not in text  # on different eval sets nothing is shared


def test_a_sweep_folder_stands_for_its_points_and_a_stray_folder_is_named(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "lr=0.0001", 1e-4, 0.8, 1.0)
    _run(root, "lr=0.0002", 2e-4, 0.6, 1.0)
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "metric": "finetuned.accuracy",
                "goal": "min",
                "points": [{"slug": "lr=0.0001"}, {"slug": "lr=0.0002"}, {"slug": "lr=0.0003"}],
            }
        )
    )  # the third has not run yet
    runs, sweep = load_runs([root])
    assert [r.label for r in runs] == ["lr=0.0001", "lr=0.0002"] and differing(runs) == ["train.lr"]
    compare_runs([root], root / "compare")
    assert json.loads((root / "compare" / "compare.json").read_text())["best"]["run"] == "lr=0.0002"  # its goal
    with pytest.raises(Exception, match="not a run folder"):
        load_runs([tmp_path / "nothing"])
