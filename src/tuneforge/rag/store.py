"""The retriever's pieces: corpus chunks, the embedder, and a FAISS index saved with a sidecar.

    runs/<name>/rag/index.faiss   the vectors (inner product on normalised = cosine)
    runs/<name>/rag/chunks.jsonl  one chunk per line: chunk_id, source, position, text
    runs/<name>/rag/index.json    embedder, dim, count, chunk ids hash, corpus sha256, index kind

Loading checks every file against the others, so a truncated index, a sidecar that
does not match, or another embedder fails with a clear error instead of returning
empty or misaligned hits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.atomic import atomic_dir, atomic_write_json, atomic_write_jsonl
from tuneforge.errors import TuneforgeError

FLAT_LIMIT = 50_000  # exact search stays fast below this many chunks (a few ms per query)
TEXT_SUFFIXES = {".md", ".txt", ".markdown", ".rst"}


@dataclass
class Chunk:
    chunk_id: str
    source: str
    position: int  # token offset of the chunk in its document
    text: str


def read_corpus(spec: str, base_dir: Path, text_column: str) -> list[tuple[str, str]]:
    """(source, text) documents from a folder of .md/.txt, a JSONL or a CSV with a text column."""
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise TuneforgeError(f"rag.corpus: {path} holds no .md or .txt files")
        return [(str(p.relative_to(path)), p.read_text(encoding="utf-8")) for p in files]
    if not path.is_file():
        raise TuneforgeError(f"rag.corpus: {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if text_column not in record:
                    raise TuneforgeError(
                        f"rag.corpus: {path.name} line {number} has no {text_column!r} (rag.text_column)"
                    )
                docs.append((f"{path.name}:{record.get('id', number)}", str(record[text_column])))
        return docs
    if path.suffix.lower() in (".csv", ".tsv"):
        import pandas as pd

        frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
        if text_column not in frame.columns:
            raise TuneforgeError(
                f"rag.corpus: {path.name} has no column {text_column!r} (columns: {', '.join(frame.columns)})"
            )
        return [(f"{path.name}:row{i}", t) for i, t in enumerate(frame[text_column], 1) if t.strip()]
    return [(path.name, path.read_text(encoding="utf-8"))]


MARKDOWN_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def heading_trail(text: str, at: int) -> list[str]:
    """The markdown headings in force at character `at`: the title, then each deeper section heading."""
    trail: dict[int, str] = {}
    for match in MARKDOWN_HEADING.finditer(text, 0, at):
        level = len(match.group(1))
        trail = {lvl: title for lvl, title in trail.items() if lvl < level}
        trail[level] = match.group(2).strip()
    return [trail[level] for level in sorted(trail)]


def chunk_documents(docs: Iterable[tuple[str, str]], tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Windows of `size` tokens of the embedder's tokenizer, `overlap` shared; exact duplicates dropped.

    A window that starts inside a markdown section is prefixed with the headings it sits under
    ("Error Codes E1–E9 › E3 – Cannot reach Kestrel"), so the embedding and the model both know what
    the passage is about even when the window cut the heading off.
    """
    chunks, seen = [], set()
    step = size - overlap
    for source, text in docs:
        # whole documents are longer than the embedder reads; they are windowed below, so no length warning
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
        start = 0
        while start < max(len(offsets), 1):
            window = offsets[start : start + size]
            begin = window[0][0] if window else 0
            piece = text[begin : window[-1][1]].strip() if window else text.strip()
            trail = heading_trail(text, begin)
            if trail and not MARKDOWN_HEADING.match(piece):  # a window that starts at a heading already says it
                piece = f"({' › '.join(trail)})\n{piece}"
            key = " ".join(piece.split())
            if piece and key not in seen:
                seen.add(key)
                chunks.append(Chunk(f"{source}#{start}", source, start, piece))
            if start + size >= len(offsets):
                break
            start += step
    return chunks


class Embedder:
    """A sentence-transformers model; embeddings are L2-normalised so inner product is cosine."""

    def __init__(self, ref: str):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise TuneforgeError(
                f"the embedder {ref} needs sentence-transformers: pip install 'tuneforge[rag]' (or [eval], or [all])"
            ) from None

        from tuneforge.models import materialize, resolve

        self.ref = ref
        self.model = SentenceTransformer(materialize(resolve(ref)), device="cpu")
        self.tokenizer = self.model.tokenizer
        # sentence-transformers 6 renamed the method; older releases only have the long name
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dimension()

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=64, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def choose_index(kind: str, count: int) -> str:
    if kind != "auto":
        return kind
    return "flat" if count <= FLAT_LIMIT else "hnsw"


def build_index(vectors: np.ndarray, kind: str):
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64  # recall@10 against exact search stays above 0.95 (benchmarks/rag_latency.py)
    elif kind == "ivf":
        lists = max(1, min(4096, int(np.sqrt(len(vectors)))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, lists // 8)
    else:
        raise TuneforgeError(f"rag.index: unknown index kind {kind!r}")
    index.add(vectors)
    return index


def _ids_hash(chunks: list[Chunk]) -> str:
    return hashlib.sha256("\n".join(c.chunk_id for c in chunks).encode()).hexdigest()


def corpus_sha256(docs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for source, text in docs:
        digest.update(source.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


def save(folder: Path, index, chunks: list[Chunk], sidecar: dict[str, Any]) -> None:
    import faiss

    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        atomic_write_jsonl(tmp / "chunks.jsonl", (asdict(c) for c in chunks))
        atomic_write_json(tmp / "index.json", {**sidecar, "count": len(chunks), "chunk_ids_sha256": _ids_hash(chunks)})


def load(folder: Path, embedder_ref: str):
    """(index, chunks, sidecar), each checked against the others."""
    import faiss

    sidecar_path = folder / "index.json"
    if not sidecar_path.exists():
        raise TuneforgeError(f"no retriever index in {folder}; run `tuneforge rag build` first")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("embedder") != embedder_ref:
        raise TuneforgeError(
            f"{folder}: the index was built with {sidecar.get('embedder')!r} "
            f"but rag.embedder is {embedder_ref!r}; rebuild it"
        )
    try:
        index = faiss.read_index(str(folder / "index.faiss"))
    except RuntimeError as exc:
        raise TuneforgeError(
            f"{folder / 'index.faiss'} is unreadable (truncated or corrupt): {str(exc).splitlines()[0]}; rebuild it"
        ) from None
    chunks = [Chunk(**json.loads(line)) for line in (folder / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
    problems = []
    if index.ntotal != sidecar.get("count") or len(chunks) != sidecar.get("count"):
        problems.append(
            f"index holds {index.ntotal} vectors, chunks.jsonl {len(chunks)}, the sidecar says {sidecar.get('count')}"
        )
    if index.d != sidecar.get("dim"):
        problems.append(f"index dimension {index.d} but the sidecar says {sidecar.get('dim')}")
    if _ids_hash(chunks) != sidecar.get("chunk_ids_sha256"):
        problems.append("chunks.jsonl does not match the chunk ids the index was built from")
    if problems:
        raise TuneforgeError(
            f"{folder}: the retriever files do not match ({'; '.join(problems)}); rebuild with `tuneforge rag build`"
        )
    return index, chunks, sidecar
