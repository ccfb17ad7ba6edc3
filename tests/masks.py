"""Helpers for tests that read training masks."""

from __future__ import annotations


def supervised_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The token ids of each contiguous stretch the mask supervises, in order."""
    runs, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
