"""Tables (CSV, TSV, Parquet, JSON lines of flat records) read in chunks with bounded memory.

Only the columns the template, the label and the cleaning rules name are read, and
cleaning is vectorised per chunk, so a multi-million-row file streams through at
hundreds of thousands of rows a second. Rows are numbered from 1 after the header.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from tuneforge.errors import TuneforgeError

CHUNK_ROWS = 200_000
ROW = "__row__"  # 1-based row number carried through every stage


@dataclass
class TableCounts:
    """Counts of the cleaning stages, for the report."""

    rows_read: int = 0
    emptied: Counter = field(default_factory=Counter)  # column -> empty cells seen
    dropped_empty: Counter = field(default_factory=Counter)  # column -> rows dropped for it
    filled: Counter = field(default_factory=Counter)  # column -> cells filled
    unescaped: int = 0
    whitespace_fixed: int = 0
    duplicates: int = 0


def sep_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        sample = fh.read(65536)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def columns_of(path: Path) -> list[str]:
    """The header of a table file, names stripped."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [c.strip() for c in pq.ParquetFile(path).schema_arrow.names]
    if suffix in (".jsonl", ".json"):
        first = next(_json_chunks(path, 1), None)
        return [] if first is None else [str(c).strip() for c in first.columns if c != ROW]
    try:
        header = pd.read_csv(path, sep=sep_for(path), nrows=0, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TuneforgeError(f"{path}: not UTF-8 text (byte {exc.start} of the header)") from None
    return [str(c).strip() for c in header.columns]


def read_chunks(path: Path, columns: list[str], chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of the named columns as text ('' for empty), with a 1-based ROW column."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        chunks = _parquet_chunks(path, columns, chunk_rows)
    elif suffix in (".jsonl", ".json"):
        chunks = (chunk[columns] for chunk in _json_chunks(path, chunk_rows))
    else:
        chunks = _csv_chunks(path, columns, chunk_rows)
    start = 1
    for chunk in chunks:
        chunk = chunk.copy()
        chunk.insert(0, ROW, np.arange(start, start + len(chunk)))
        start += len(chunk)
        yield chunk


def _csv_chunks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    wanted = set(columns)
    reader = pd.read_csv(
        path,
        sep=sep_for(path),
        dtype=str,
        keep_default_na=False,  # an empty cell is '', never NaN or the string 'nan'
        na_filter=False,
        usecols=lambda name: str(name).strip() in wanted,
        chunksize=chunk_rows,
        encoding="utf-8",
        engine="c",
    )
    try:
        for chunk in reader:
            chunk.columns = [str(c).strip() for c in chunk.columns]
            yield chunk
    except UnicodeDecodeError as exc:
        raise TuneforgeError(f"{path}: not UTF-8 text near byte {exc.start}; re-save the file as UTF-8") from None
    except pd.errors.ParserError as exc:
        raise TuneforgeError(f"{path}: {str(exc).strip()}") from None


def _parquet_chunks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    names = {n.strip(): n for n in table.schema_arrow.names}
    for batch in table.iter_batches(batch_size=chunk_rows, columns=[names[c] for c in columns]):
        frame = batch.to_pandas()
        frame.columns = [str(c).strip() for c in frame.columns]
        yield _as_text(frame)


def _json_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    lines = path.suffix.lower() == ".jsonl"
    try:
        if lines:
            for frame in pd.read_json(path, lines=True, chunksize=rows, dtype=False):
                yield _as_text(frame)
        else:
            yield _as_text(pd.read_json(path, dtype=False))
    except ValueError as exc:
        raise TuneforgeError(f"{path}: cannot read as a table of records: {exc}") from None


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda col: col.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)))


# Plain strings, not compiled patterns: on Arrow-backed text pandas then runs them in C++ (RE2).
_RUNS = "[ \t\u00a0]{2,}|\t"
_INNER_MESS = "[ \t\u00a0]{2}|\t|\r"  # no \s or $: either sends pandas back to Python's re


def clean_chunk(chunk: pd.DataFrame, clean, counts: TableCounts) -> pd.DataFrame:
    """Apply the cleaning rules to one chunk, counting what each rule did."""
    counts.rows_read += len(chunk)
    text_columns = [c for c in chunk.columns if c != ROW]
    for col in text_columns:
        series = chunk[col]
        if clean.html_unescape:
            has_entity = series.str.contains("&", regex=False)
            if has_entity.any():
                fixed = series[has_entity].map(html.unescape)
                counts.unescaped += int((fixed != series[has_entity]).sum())
                series = series.copy()
                series[has_entity] = fixed
        if clean.normalize_whitespace:
            messy = (series.str.strip() != series) | series.str.contains(_INNER_MESS)
            if messy.any():
                fixed = (
                    series[messy]
                    .str.replace("\r\n", "\n", regex=False)
                    .str.replace(_RUNS, " ", regex=True)
                    .str.strip()
                )
                counts.whitespace_fixed += int((fixed != series[messy]).sum())
                series = series.copy()
                series[messy] = fixed
        chunk[col] = series
        counts.emptied[col] += int((series == "").sum())
    for col in clean.drop_empty:
        empty = chunk[col] == ""
        counts.dropped_empty[col] += int(empty.sum())
        chunk = chunk[~empty]
    for col, value in clean.fill_empty.items():
        empty = chunk[col] == ""
        counts.filled[col] += int(empty.sum())
        chunk.loc[empty, col] = value
    return chunk


class Deduper:
    """Drops rows whose used columns exactly repeat an earlier row (64-bit hashes: bounded memory)."""

    def __init__(self):
        self.seen: set[int] = set()

    def __call__(self, chunk: pd.DataFrame, counts: TableCounts) -> pd.DataFrame:
        cols = [c for c in chunk.columns if c != ROW]
        hashes = pd.util.hash_pandas_object(chunk[cols], index=False).to_numpy()
        keep = np.ones(len(chunk), dtype=bool)
        seen = self.seen
        for i, h in enumerate(hashes.tolist()):
            if h in seen:
                keep[i] = False
            else:
                seen.add(h)
        counts.duplicates += int((~keep).sum())
        return chunk[keep]


class Sampler:
    """A seeded uniform sample of `k` rows from a stream: every row draws a random key, the k smallest stay."""

    def __init__(self, k: int | None, seed: int):
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.kept: pd.DataFrame | None = None
        self.keys = np.empty(0)

    def add(self, chunk: pd.DataFrame) -> None:
        keys = self.rng.random(len(chunk))
        if self.kept is None:
            self.kept, self.keys = chunk, keys
        else:
            self.kept = pd.concat([self.kept, chunk], ignore_index=True)
            self.keys = np.concatenate([self.keys, keys])
        if self.k is not None and len(self.kept) > self.k:
            best = np.argsort(self.keys, kind="stable")[: self.k]
            best.sort()  # keep file order among the chosen rows
            self.kept = self.kept.iloc[best].reset_index(drop=True)
            self.keys = self.keys[best]

    def rows(self) -> pd.DataFrame:
        return self.kept if self.kept is not None else pd.DataFrame()
