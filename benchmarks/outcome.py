"""Does fine-tuning pay off with the defaults? prepare -> train -> eval on a labelled table, held-out part scored.

The table is split once (seeded, stratified by label) into a training part and a
held-out part. The experiment file names only the column template, the label and
the held-out file: every training knob is left to `auto`, as a new user leaves it.
Then `tuneforge prepare`, `train` and `eval` run as a user runs them, each timed,
and the held-out scores print side by side:

    base       the builtin model before training, labels scored by likelihood
    finetuned  the adapter `train` kept
    tfidf      TF-IDF + logistic regression on the same training part
    majority   always the most common training label (the floor)

    python benchmarks/outcome.py                                   # the shipped review table
    python benchmarks/outcome.py --preset drug-reviews --table ../shared/data/drug-reviews-dev.tsv
    python benchmarks/outcome.py --preset drug-reviews --table ... --seed 42 1 7   # three different held-out splits

Prints accuracy and macro-F1 per system, the margin and ratio of finetuned over
tfidf and over the majority floor, the training plan auto chose, and the wall time
of each verb; with several seeds, each split's figures and then their mean and range
(one held-out split of 150 reviews moves accuracy by about 0.03 either way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRESETS = {
    "reviews": {
        "table": REPO / "examples" / "data" / "reviews" / "reviews.csv",
        "system": "Classify the sentiment of a product review. Answer with one word: positive or negative.",
        "user": "Product: {product}\nTitle: {title}\nReview: {review}",
        "label": "sentiment",
    },
    "drug-reviews": {
        "table": None,
        "system": (
            "Classify the sentiment of a patient's medication review. "
            "Answer with one word: positive, neutral or negative."
        ),
        "user": "Drug: {drugName}\nCondition: {condition}\nReview: {review}",
        "label": "rating",
    },
}


def split_table(table: Path, label: str, holdout: float, seed: int, folder: Path) -> tuple[Path, Path]:
    """Seeded, stratified train / held-out files in the table's own format."""
    import pandas as pd

    sep = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    frame = pd.read_csv(table, sep=sep, dtype=str, keep_default_na=False)
    frame = frame[frame[label].str.strip() != ""]
    held = frame.groupby(label, group_keys=False).sample(frac=holdout, random_state=seed)
    rest = frame.drop(held.index)
    out = []
    for name, part in (("train", rest), ("heldout", held)):
        path = folder / f"{name}{table.suffix}"
        part.to_csv(path, sep=sep, index=False)
        out.append(path)
    return out[0], out[1]


def timed(verb: str, experiment: Path, *extra: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tuneforge", verb, str(experiment), *extra], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"tuneforge {verb} failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    print(f"\n$ tuneforge {verb}  ({seconds:.0f} s)\n" + "\n".join(f"  {line}" for line in lines[-12:]), flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reviews")
    parser.add_argument("--table", type=Path, help="the labelled table (default: the preset's)")
    parser.add_argument("--holdout", type=float, default=0.25, help="share held out for scoring (stratified)")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[42],
        help="the split's (and the experiment's) seed; several: one run each",
    )
    parser.add_argument(
        "--work", type=Path, help="keep the split, the experiment and the run here (default: a temp folder)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="dotted.key=value for the experiment, e.g. train.label_weights=balanced",
    )
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    table = args.table or preset["table"]
    if table is None:
        sys.exit(f"--preset {args.preset} needs --table PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="tuneforge-outcome-"))
    results = [
        run_split(args, preset, Path(table), work / f"seed-{seed}" if len(args.seed) > 1 else work, seed)
        for seed in args.seed
    ]
    if len(results) > 1:
        print(f"\n{len(results)} held-out splits (seeds {', '.join(map(str, args.seed))}): mean [min, max]")
        print(f"{'system':<10}  {'accuracy':>22}  {'macro-F1':>22}")
        for name in ("base", "finetuned", "tfidf", "majority"):
            cells = []
            for metric in ("accuracy", "macro_f1"):
                values = [r["metrics"][name][metric] for r in results]
                cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
            print(f"{name:<10}  {cells[0]:>22}  {cells[1]:>22}")
        minutes = [(r["seconds"]["prepare"] + r["seconds"]["train"]) / 60 for r in results]
        print(f"prepare + train: {min(minutes):.1f} to {max(minutes):.1f} min")


def run_split(args, preset: dict, table: Path, work: Path, seed: int) -> dict:
    """One held-out split: prepare, train and eval as a user runs them; prints and returns the figures."""
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = split_table(table.resolve(), preset["label"], args.holdout, seed, work)
    experiment = work / "outcome.yaml"
    experiment.write_text(
        json.dumps(
            {  # JSON is YAML: only the template, the label and the held-out file are set
                "name": "outcome",
                "seed": seed,
                "data": {
                    "train": train.name,
                    "label": preset["label"],
                    "template": {
                        "system": preset["system"],
                        "user": preset["user"],
                        "assistant": "{" + preset["label"] + "}",
                    },
                },
                "eval": {"data": heldout.name, "systems": ["base", "finetuned", "tfidf"]},
            },
            indent=2,
        )
    )
    run_dir = ["--run-dir", str(work / "run"), *args.override]

    seconds = {verb: timed(verb, experiment, *run_dir) for verb in ("prepare", "train", "eval")}
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    plan = json.loads((work / "run" / "manifest.json").read_text())["train"]["plan"]

    print(
        f"\n{args.preset}: {table.name} (seed {seed}), {metrics['finetuned']['examples']} held-out examples; "
        f"run in {work / 'run'}"
    )
    chosen = "auto" if not args.override else f"auto, with {', '.join(args.override)}"
    print(
        f"plan ({chosen}): {plan['steps']} steps, {plan['epochs']:g} epochs, batch {plan['batch_size']}, "
        f"lr {plan['lr']:g}, "
        f"prompt loss {plan.get('prompt_loss_weight', 0):g}, packing {'on' if plan['packing'] else 'off'}"
    )
    print(f"\n{'system':<10}  {'accuracy':>8}  {'macro-F1':>8}")
    for name in ("base", "finetuned", "tfidf", "majority"):
        print(f"{name:<10}  {metrics[name]['accuracy']:>8.3f}  {metrics[name]['macro_f1']:>8.3f}")
    tuned, tfidf, floor = (metrics[n]["accuracy"] for n in ("finetuned", "tfidf", "majority"))
    print(
        f"\nfinetuned - tfidf: {tuned - tfidf:+.3f} accuracy (ratio {tuned / tfidf:.3f}), "
        f"{metrics['finetuned']['macro_f1'] - metrics['tfidf']['macro_f1']:+.3f} macro-F1"
    )
    print(f"finetuned - majority: {tuned - floor:+.3f} accuracy (ratio {tuned / floor:.3f})")
    print(
        f"wall time: prepare {seconds['prepare']:.0f} s, train {seconds['train']:.0f} s "
        f"(prepare + train {(seconds['prepare'] + seconds['train']) / 60:.1f} min), eval {seconds['eval']:.0f} s"
    )
    return {"metrics": metrics, "seconds": seconds, "plan": plan}


if __name__ == "__main__":
    main()
