"""The retriever on the shipped knowledge base with the builtin embedder and a real FAISS index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.config import load_experiment
from tuneforge.errors import TuneforgeError
from tuneforge.rag import retriever as rag
from tuneforge.run import RunDir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    experiment = load_experiment(QUICKSTART)
    run = RunDir(experiment, tmp_path_factory.mktemp("rag") / "run").start("rag build")
    summary = rag.build(experiment, run, progress=False)
    return experiment, run, summary


def test_build_writes_index_chunks_and_sidecar(built):
    experiment, run, summary = built
    assert summary["documents"] == 19 and summary["index"] == "flat" and summary["dim"] == 384
    sidecar = json.loads(run.sub("rag", "index.json").read_text())
    assert sidecar["count"] == summary["count"] == len(run.sub("rag", "chunks.jsonl").read_text().splitlines())
    assert len(sidecar["corpus_sha256"]) == 64


def test_right_page_first_and_recall_on_shipped_questions(built):
    experiment, run, _ = built
    retriever = rag.Retriever(experiment, run)
    assert retriever.search(["My thermostat shows E3, what does it mean?"])[0][0].source == "error-codes.md"
    pairs = [(json.loads(l)["messages"][1]["content"], json.loads(l)["meta"]["source"])
             for l in (REPO / "examples/data/support/eval.jsonl").read_text().splitlines()]
    report = rag.evaluate(retriever, pairs, k=4)
    assert report["recall@4"] >= 0.9 and report["mrr"] > 0.7


def test_reload_in_a_new_process_gives_identical_hits(built):
    experiment, run, _ = built
    question = "How do I cancel Kestrel Plus?"
    here = [h.to_json() for h in rag.Retriever(experiment, run).search([question])[0]]
    out = subprocess.run([sys.executable, "-m", "tuneforge", "rag", "query", str(QUICKSTART), "--json", question, "--run-dir", str(run.path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout)
    assert [h["chunk_id"] for h in there] == [h["chunk_id"] for h in here]
    assert [h["score"] for h in there] == pytest.approx([h["score"] for h in here], abs=1e-5)
    assert set(there[0]) == {"source", "score", "text", "chunk_id"} and there[0]["source"] == "kestrel-plus.md"


def test_damaged_or_mismatched_files_fail_clearly(built, tmp_path):
    import shutil

    experiment, run, _ = built
    copy = RunDir(experiment, tmp_path / "copy")
    shutil.copytree(run.sub("rag"), copy.sub("rag"))
    index = copy.sub("rag", "index.faiss")
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with pytest.raises(TuneforgeError, match="truncated or corrupt"):
        rag.Retriever(experiment, copy)

    shutil.copy(run.sub("rag", "index.faiss"), index)
    chunks = copy.sub("rag", "chunks.jsonl")
    chunks.write_text("\n".join(chunks.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(TuneforgeError, match="do not match"):
        rag.Retriever(experiment, copy)

    other = load_experiment(QUICKSTART, ["rag.embedder=some-org/other-embedder"])
    with pytest.raises(TuneforgeError, match="built with 'builtin:all-minilm-l6-v2'"):
        rag.Retriever(other, RunDir(other, run.path))
