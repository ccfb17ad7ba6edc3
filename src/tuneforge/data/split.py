"""Seeded sampling and splitting (stratified by label when there is one)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def sample(items: Sequence[T], k: int | None, seed: int) -> list[T]:
    """k items drawn uniformly without replacement, kept in their original order."""
    if k is None or k >= len(items):
        return list(items)
    chosen = np.random.default_rng(seed).choice(len(items), size=k, replace=False)
    return [items[i] for i in sorted(chosen.tolist())]


def split(
    items: Sequence[T], share: float, seed: int, labels: Sequence[str | None] | None = None
) -> tuple[list[T], list[T]]:
    """(train, valid) with `share` of the items in valid, per label when labels are given.

    Every label with at least two items gets at least one in each side, so a
    rare class is never missing from the validation split.
    """
    if share <= 0 or len(items) < 2:
        return list(items), []
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i in range(len(items)):
        groups[labels[i] if labels is not None else None].append(i)
    valid_idx: list[int] = []
    for key in sorted(groups, key=str):
        members = groups[key]
        n_valid = int(round(len(members) * share))
        if len(members) >= 2:
            n_valid = min(max(n_valid, 1), len(members) - 1)
        picked = rng.permutation(len(members))[:n_valid]
        valid_idx.extend(members[j] for j in picked)
    chosen = set(valid_idx)
    train = [items[i] for i in range(len(items)) if i not in chosen]
    valid = [items[i] for i in sorted(chosen)]
    return train, valid
