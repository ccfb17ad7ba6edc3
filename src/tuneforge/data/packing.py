"""Packing: short examples share rows of up to `max_length` tokens, so no compute goes to padding.

prepare counts the rows to estimate the optimizer steps, and train feeds them, so
both use this one function and always agree.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]  # lengths of the examples packed into this row, in order
    weights: list[float] | None = None  # loss weight of each of those examples (train.label_weights), None for all 1


def pack(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing).

    Ties in length are broken by a seeded shuffle so the packing is reproducible but
    not tied to file order.
    """
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = sorted(order.tolist(), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), kept sorted
    for index in order:
        need = lengths[index]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([index])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


def build_rows(
    examples: list[tuple[list[int], list[int]]],
    capacity: int,
    packing: bool,
    seed: int,
    weights: list[float] | None = None,
) -> list[Row]:
    """Rows for the trainer: packed when asked, else one example per row; `weights` are per example."""
    groups = pack([len(ids) for ids, _ in examples], capacity, seed) if packing else [[i] for i in range(len(examples))]
    rows = []
    for members in groups:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += examples[i][0]
            labels += examples[i][1]
        rows.append(
            Row(
                ids,
                labels,
                [len(examples[i][0]) for i in members],
                None if weights is None else [weights[i] for i in members],
            )
        )
    return rows
