"""Prepare a review dump the size of use case 1 (3.4M rows, ~650 MB, 9 columns, many empty cells).

Generates the CSV once (cached under --workdir), then runs two ways, each in its own
process so peak memory is measured separately:

  baseline   what the use case did by hand: pandas reads the whole file, fills
             nulls, drops duplicates, samples 1,000 rows, builds the messages
  tuneforge  `prepare`: streams only the needed columns in chunks, cleans, dedupes,
             samples 1,000 (seeded), maps, validates, tokenizes, splits, writes

Prints rows/s and peak RSS for both, their ratios, and the goals (peak RSS under
2 GB; reading and cleaning at least 100k rows/s on 2 cores).

    python benchmarks/prepare_large.py [--rows 3400000] [--workdir /tmp/tuneforge-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    "reviewId",
    "userName",
    "content",
    "score",
    "thumbsUpCount",
    "reviewCreatedVersion",
    "at",
    "replyContent",
    "repliedAt",
]
OPENERS = [
    "I use this app daily",
    "Installed it last week",
    "After the latest update",
    "Honestly",
    "For what it's worth",
    "My kids love it but",
]
MIDDLES = [
    "the sync is slow &amp; flaky",
    "it crashes when I open settings",
    "the new layout is clean and fast",
    "notifications arrive twice",
    "it&#039;s the best budgeting tool I&#039;ve tried",
    "login keeps failing on Wi-Fi",
    "dark mode looks great",
    "ads pop up every few seconds",
    "offline mode saved my trip",
    "battery drain is noticeable",
]
CLOSERS = ["Five stars.", "Please fix this.", "Would recommend.", "Uninstalling.", "Still the best option.", "", "Meh."]


def generate(path: Path, rows: int, seed: int = 0, block: int = 200_000) -> None:
    rng = np.random.default_rng(seed)
    texts = np.array(
        [
            f"{o}, {m} and {m2}. {c}".strip()
            for o in OPENERS
            for m in MIDDLES
            for m2 in MIDDLES[::-1]
            if m != m2
            for c in CLOSERS
        ],
        dtype=object,
    )
    texts = np.array([t if i % 5 else "  " + t.replace(" ", "  ", 2) + " " for i, t in enumerate(texts)], dtype=object)
    users = np.array(
        [f"Reviewer {a} {b}" for a in ("Ana", "Bo", "Chen", "Dara", "Eli") for b in range(4_000)], dtype=object
    )
    replies = np.array(
        [
            "Thanks for the feedback! Please contact support@example.com.",
            "We fixed this in 5.2.",
            "Sorry to hear that.",
        ],
        dtype=object,
    )
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            content = texts[rng.integers(0, len(texts), n)]
            content[rng.random(n) < 0.08] = ""
            version = np.array([f"5.{a}.{b}" for a, b in rng.integers(0, 9, (n, 2))], dtype=object)
            version[rng.random(n) < 0.25] = ""
            has_reply = rng.random(n) < 0.06
            frame = pd.DataFrame(
                {
                    "reviewId": [f"gp:AOqpTO{x:016x}{y:016x}" for x, y in rng.integers(0, 2**62, (n, 2))],
                    "userName": users[rng.integers(0, len(users), n)],
                    "content": content,
                    "score": rng.integers(1, 6, n),
                    "thumbsUpCount": rng.integers(0, 50, n),
                    "reviewCreatedVersion": version,
                    "at": pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 3 * 365 * 86400, n), unit="s"),
                    "replyContent": np.where(has_reply, replies[rng.integers(0, 3, n)], ""),
                    "repliedAt": np.where(has_reply, "2024-02-01 10:00:00", ""),
                },
                columns=COLUMNS,
            )
            frame.to_csv(fh, header=start == 0, index=False)
            print(f"\rgenerating {start + n:,}/{rows:,} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tmp.rename(path)


EXPERIMENT = """\
name: bench-prepare
seed: 42
model: builtin:smollm2-135m-instruct
data:
  train: {csv}
  template:
    system: "You answer questions about app reviews."
    user: "Review (app version {{reviewCreatedVersion}}): {{content}}\\nHow many stars did the reviewer give?"
    assistant: "{{score}}"
  label: score
  clean: {{drop_empty: [content], fill_empty: {{reviewCreatedVersion: unknown}}, dedupe: true}}
  sample: 1000
  valid_split: 0.3
  max_length: 256
"""


def child_tuneforge(csv: Path, workdir: Path) -> dict:
    from tuneforge.config import load_experiment
    from tuneforge.data.prepare import prepare
    from tuneforge.run import RunDir

    exp_path = workdir / "bench-prepare.yaml"
    exp_path.write_text(EXPERIMENT.format(csv=csv))
    experiment = load_experiment(exp_path)
    run = RunDir(experiment, workdir / "run").start("prepare")
    started = time.perf_counter()
    report = prepare(experiment, run, progress=sys.stderr.isatty())
    total = time.perf_counter() - started
    rows = report["stages"]["train"][0]["count"]
    return {
        "rows": rows,
        "read_clean_s": report["seconds"]["read_clean_sample"],
        "total_s": total,
        "examples": report["counts"]["train"] + report["counts"]["valid"],
    }


def child_baseline(csv: Path, workdir: Path) -> dict:
    """Use case 1 by hand: load everything, fill nulls, dedupe, sample, build messages."""
    started = time.perf_counter()
    frame = pd.read_csv(csv)
    rows = len(frame)
    frame = frame.dropna(subset=["content"])
    frame["reviewCreatedVersion"] = frame["reviewCreatedVersion"].fillna("unknown")
    frame = frame.drop_duplicates(subset=["content", "reviewCreatedVersion", "score"])
    read_clean = time.perf_counter() - started
    sample = frame.sample(1000, random_state=42)
    examples = [
        {
            "messages": [
                {"role": "system", "content": "You answer questions about app reviews."},
                {
                    "role": "user",
                    "content": (
                        f"Review (app version {r.reviewCreatedVersion}): {r.content}\n"
                        "How many stars did the reviewer give?"
                    ),
                },
                {"role": "assistant", "content": str(r.score)},
            ]
        }
        for r in sample.itertuples()
    ]
    return {
        "rows": rows,
        "read_clean_s": read_clean,
        "total_s": time.perf_counter() - started,
        "examples": len(examples),
    }


def run_child(kind: str, csv: Path, workdir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--csv", str(csv), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_400_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tuneforge-bench"))
    parser.add_argument("--child", choices=["tuneforge", "baseline"])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.child:
        result = (child_tuneforge if args.child == "tuneforge" else child_baseline)(args.csv, args.workdir)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    csv = args.workdir / f"reviews-{args.rows}.csv"
    if not csv.exists():
        generate(csv, args.rows)
    size_mb = csv.stat().st_size / 2**20
    print(f"input: {csv} ({args.rows:,} rows, {size_mb:,.0f} MB, {len(COLUMNS)} columns)")
    results = {kind: run_child(kind, csv, args.workdir) for kind in ("baseline", "tuneforge")}
    print(f"\n{'':<12}{'read+clean rows/s':>20}{'read+clean s':>14}{'total s':>10}{'peak RSS MB':>14}{'examples':>10}")
    for kind, r in results.items():
        r["rows_per_s"] = r["rows"] / r["read_clean_s"]
        print(
            f"{kind:<12}{r['rows_per_s']:>20,.0f}{r['read_clean_s']:>14.1f}{r['total_s']:>10.1f}{r['peak_rss_mb']:>14,.0f}{r['examples']:>10}"
        )
    base, ours = results["baseline"], results["tuneforge"]
    print(f"\nrows/s ratio (tuneforge / baseline): {ours['rows_per_s'] / base['rows_per_s']:.2f}")
    print(f"peak RSS ratio (tuneforge / baseline): {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}")
    print(
        f"goal peak RSS < 2048 MB: {'met' if ours['peak_rss_mb'] < 2048 else 'MISSED'} ({ours['peak_rss_mb']:,.0f} MB)"
    )
    print(
        f"goal read+clean >= 100k rows/s: {'met' if ours['rows_per_s'] >= 100_000 else 'MISSED'} "
        f"({ours['rows_per_s']:,.0f} rows/s)"
    )


if __name__ == "__main__":
    main()
