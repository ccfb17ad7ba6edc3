"""A small labelled review table for training tests: `review,sentiment` rows whose text gives the label away."""

from __future__ import annotations

import csv
from pathlib import Path


def write_reviews(path: Path, rows: int, cycle: list[str], text) -> Path:
    """`rows` rows whose labels follow `cycle`; text(label, i) writes each review."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            label = cycle[i % len(cycle)]
            writer.writerow([text(label, i), label])
    return path
