"""Tables (CSV, TSV, Parquet, JSON lines of flat records) read in chunks with bounded memory.

Only the columns the template, the label and the cleaning rules name are read, and
cleaning is vectorised per chunk, so a multi-million-row file streams through at
hundreds of thousands of rows a second. Rows are numbered from 1 after the header.
"""

from __future__ import annotations

import codecs
import csv
import html
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


BLOCK = 1 << 20
# When a legacy file's bytes fit several code pages equally well, the one most files are written in wins.
COMMON_ENCODINGS = (
    "cp1252",
    "cp1251",
    "cp1250",
    "cp932",
    "gb18030",
    "big5",
    "cp949",
    "cp1253",
    "cp1254",
    "cp1256",
    "cp1255",
)
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class Undecodable:
    """Where a file stops being text in a codec: byte offset, 1-based line and column."""

    byte: int
    line: int
    column: int

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}, byte {self.byte}"


def first_undecodable(path: Path, encoding: str) -> Undecodable | None:
    """Stream the file through the codec; the first byte it cannot decode, or None."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK)
            buffered = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                return _place(path, offset - buffered + exc.start, encoding)
            if not block:
                return None
            offset += len(block)


def _place(path: Path, byte: int, encoding: str) -> Undecodable:
    line, line_start, offset = 1, 0, 0
    with open(path, "rb") as fh:
        while offset < byte:
            block = fh.read(min(BLOCK, byte - offset))
            count = block.count(b"\n")
            if count:
                line += count
                line_start = offset + block.rindex(b"\n") + 1
            offset += len(block)
        fh.seek(line_start)
        before = fh.read(byte - line_start).decode(encoding, errors="replace")
    return Undecodable(byte, line, len(before) + 1)


def detect_encoding(path: Path) -> tuple[str, str]:
    """(codec, how it was found) for a text table: a BOM, UTF-8 when every byte is, else the best-fitting legacy
    code page."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    for bom, name in BOMS:
        if head.startswith(bom):
            return name, "byte-order mark"
    bad = first_undecodable(path, "utf-8")
    if bad is None:
        return "utf-8", "every byte is UTF-8"
    from charset_normalizer import from_bytes

    with open(path, "rb") as fh:  # the start and the region of the first non-UTF-8 byte
        sample = fh.read(BLOCK)
        if bad.byte > BLOCK:
            fh.seek(max(BLOCK, bad.byte - 4096))
            sample += b"\n" + fh.read(BLOCK)
    matches = list(from_bytes(sample))
    guess = None
    if matches:
        least = min(m.chaos for m in matches)
        fitting = [m for m in matches if m.chaos <= least + 0.01]
        names = {codecs.lookup(n).name for m in fitting for n in m.could_be_from_charset}
        guess = next((n for n in COMMON_ENCODINGS if codecs.lookup(n).name in names), fitting[0].encoding)
    for name in (guess, "cp1252", "latin-1"):  # latin-1 decodes any bytes: the last resort
        if name and first_undecodable(path, name) is None:
            return codecs.lookup(name).name, f"detected: not UTF-8 at {bad}"
    raise AssertionError("latin-1 decodes every byte")


@dataclass
class TableFile:
    """One table file with what reading it needs: the codec, the delimiter, and the rows whose field count is off."""

    path: Path
    encoding: str = "utf-8"
    found: str = ""  # how the encoding was chosen, for the report
    sep: str = ","
    header_fields: int = 0
    ragged: dict[int, tuple[int, int]] = field(default_factory=dict)  # row -> (line, fields)

    @property
    def text(self) -> bool:
        return self.path.suffix.lower() not in (".parquet", ".jsonl", ".json")

    def note(self) -> str:
        return f"{self.encoding} ({self.found})" if self.found else self.encoding


def open_table(path: Path, encoding: str = "auto", where: str = "data") -> TableFile:
    """Settle how to read a table file: check or detect its encoding, find its delimiter and its ragged rows."""
    table = TableFile(path)
    if not table.text:
        return table
    if encoding == "auto":
        table.encoding, table.found = detect_encoding(path)
    else:
        bad = first_undecodable(path, encoding)
        if bad is not None:
            raise TuneforgeError(
                f"{where}: {path.name} is not {encoding} text at {bad}; "
                "set data.encoding to the file's encoding (or auto to detect it)"
            )
        table.encoding, table.found = encoding, "data.encoding"
    table.sep = sep_for(path, table.encoding)
    _find_ragged(table)
    return table


def _find_ragged(table: TableFile) -> None:
    """Rows with more or fewer fields than the header, numbered as the readers number them (blank lines skipped)."""
    with open(table.path, newline="", encoding=table.encoding) as fh:
        reader = csv.reader(fh, delimiter=table.sep)
        try:
            header = next(reader, [])
            table.header_fields = len(header)
            row = 0
            for record in reader:
                if not record:
                    continue
                row += 1
                if len(record) != table.header_fields:
                    table.ragged[row] = (reader.line_num, len(record))
        except csv.Error as exc:
            raise TuneforgeError(f"{table.path.name} line {reader.line_num}: {exc}") from None


def sep_for(path: Path, encoding: str = "utf-8") -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    with open(path, newline="", encoding=encoding, errors="replace") as fh:
        sample = fh.read(65536)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def columns_of(path: Path | TableFile) -> list[str]:
    """The header of a table file, names stripped."""
    table = path if isinstance(path, TableFile) else TableFile(path)
    suffix = table.path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [c.strip() for c in pq.ParquetFile(table.path).schema_arrow.names]
    if suffix in (".jsonl", ".json"):
        first = next(_json_chunks(table.path, 1), None)
        return [] if first is None else [str(c).strip() for c in first.columns if c != ROW]
    try:
        header = pd.read_csv(table.path, sep=sep_for(table.path, table.encoding), nrows=0, encoding=table.encoding)
    except UnicodeDecodeError as exc:
        raise TuneforgeError(
            f"{table.path}: not {table.encoding} text (byte {exc.start} of the header); set data.encoding"
        ) from None
    return [str(c).strip() for c in header.columns]


def read_chunks(path: Path | TableFile, columns: list[str], chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of the named columns as text ('' for empty), with a 1-based ROW column."""
    table = path if isinstance(path, TableFile) else TableFile(path)
    suffix = table.path.suffix.lower()
    if suffix == ".parquet":
        chunks = _parquet_chunks(table.path, columns, chunk_rows)
    elif suffix in (".jsonl", ".json"):
        chunks = (chunk[columns] for chunk in _json_chunks(table.path, chunk_rows))
    else:
        chunks = _csv_chunks(table, columns, chunk_rows)
    start = 1
    for chunk in chunks:
        chunk = chunk.copy()
        chunk.insert(0, ROW, np.arange(start, start + len(chunk)))
        start += len(chunk)
        yield chunk


def _csv_chunks(table: TableFile, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    wanted = set(columns)
    reader = pd.read_csv(
        table.path,
        sep=table.sep if table.found else sep_for(table.path, table.encoding),  # found: open_table settled it
        dtype=str,
        keep_default_na=False,  # an empty cell is '', never NaN or the string 'nan'
        na_filter=False,
        usecols=lambda name: str(name).strip() in wanted,
        chunksize=chunk_rows,
        encoding=table.encoding,
        engine="c",
    )
    try:
        for chunk in reader:
            chunk.columns = [str(c).strip() for c in chunk.columns]
            yield chunk
    except UnicodeDecodeError:
        bad = first_undecodable(table.path, table.encoding)
        raise TuneforgeError(
            f"{table.path.name}: not {table.encoding} text at {bad}; set data.encoding to the file's encoding (or auto)"
        ) from None
    except pd.errors.ParserError as exc:
        raise TuneforgeError(f"{table.path}: {str(exc).strip()}") from None


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
    return frame.apply(
        lambda col: col.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    )


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
                    series[messy].str.replace("\r\n", "\n", regex=False).str.replace(_RUNS, " ", regex=True).str.strip()
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
