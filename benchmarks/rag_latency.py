"""Retriever speed: index build and query latency at 10k and 100k chunks, exact (flat) vs HNSW.

Index timings use 384-d normalised vectors in clusters (the builtin embedder's size),
so they exclude embedding time; the embedder's own throughput is measured
separately on real knowledge-base chunks. HNSW is scored against exact search
(recall@10 must stay at or above 0.95).

    python benchmarks/rag_latency.py [--sizes 10000 100000] [--queries 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 200, 10), dim))
    out = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, dim))
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype("float32")


def embedder_throughput() -> tuple[float, int]:
    from tuneforge.rag import store

    embedder = store.Embedder("builtin:all-minilm-l6-v2")
    docs = store.read_corpus(str(REPO / "examples/data/support/kb"), REPO, "text")
    chunks = [c.text for c in store.chunk_documents(docs, embedder.tokenizer, 128, 32)]
    texts = (chunks * (2000 // len(chunks) + 1))[:2000]
    embedder.encode(texts[:64])
    started = time.perf_counter()
    embedder.encode(texts)
    return len(texts) / (time.perf_counter() - started), len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()

    from tuneforge.rag import store

    rate, n_chunks = embedder_throughput()
    print(
        f"embedding (builtin all-MiniLM-L6-v2, CPU): {rate:,.0f} chunks/s on {n_chunks} real KB chunks of <=128 tokens"
    )
    print(f"\n{'chunks':>8} {'index':>6} {'build chunks/s':>15} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}")
    for n in args.sizes:
        base = vectors(n, args.dim, seed=n)
        queries = base[np.random.default_rng(1).integers(0, n, args.queries)] + 0.05 * vectors(
            args.queries, args.dim, seed=2
        )
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype("float32")
        exact_ids = None
        p95_of: dict[str, float] = {}
        for kind in ("flat", "hnsw"):
            started = time.perf_counter()
            index = store.build_index(base, kind)
            build_rate = n / (time.perf_counter() - started)
            latencies = []
            found = []
            for q in queries:
                t = time.perf_counter()
                _, ids = index.search(q[None], 10)
                latencies.append((time.perf_counter() - t) * 1000)
                found.append(ids[0])
            found = np.array(found)
            if kind == "flat":
                exact_ids = found
            recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact_ids)])
            p50, p95 = np.percentile(latencies, [50, 95])
            p95_of[kind] = p95
            print(f"{n:>8} {kind:>6} {build_rate:>15,.0f} {p50:>8.3f} {p95:>8.3f} {recall:>10.3f}")
            if kind == "hnsw" and n == max(args.sizes):
                print(
                    f"\nHNSW at {n:,} chunks: p95 {p95:.3f} ms (goal < 5 ms: {'met' if p95 < 5 else 'MISSED'}), "
                    f"recall@10 {recall:.3f} (goal >= 0.95: {'met' if recall >= 0.95 else 'MISSED'}); "
                    f"speedup over flat p95: {p95_of['flat'] / p95:.1f}x"
                )


if __name__ == "__main__":
    main()
