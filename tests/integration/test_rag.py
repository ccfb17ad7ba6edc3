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
    records = [json.loads(line) for line in (REPO / "examples/data/support/eval.jsonl").read_text().splitlines()]
    pairs = [([m["content"] for m in r["messages"] if m["role"] == "user"], r["meta"]["source"]) for r in records]
    report = rag.evaluate(retriever, pairs, k=4)
    assert report["recall@4"] >= 0.9 and report["mrr"] > 0.7
    # recall@1 is the share of questions whose first hit is their page, searched here on its own (as a +rag system
    # does, the conversation's turns together); the builtin embedder puts 44 of the 52 first
    first = [hits[0].source for hits in retriever.search_conversations([turns for turns, _ in pairs], 1)]
    assert report["recall@1"] == pytest.approx(sum(f == s for f, (_, s) in zip(first, pairs)) / len(pairs), abs=1e-4)
    assert report["recall@1"] >= 0.8
    assert len(report["misses"]) == round((1 - report["recall@4"]) * len(pairs))  # each question not in the top 4
    assert report["multi_turn"]["questions"] == sum(len(t) > 1 for t, _ in pairs) >= 12
    assert all(set(m) == {"question", "earlier_turns", "expected", "retrieved"} for m in report["misses"])


def test_a_follow_up_is_retrieved_with_its_conversation(built):
    experiment, run, _ = built
    retriever = rag.Retriever(experiment, run)
    follow_up = ["Which battery goes in the KS1 sensor?", "How long will it last?"]
    alone = retriever.search([follow_up[-1]])[0]
    assert alone[0].source != "remote-sensors.md"  # the last turn alone names nothing
    assert retriever.search_conversations([follow_up])[0][0].source == "remote-sensors.md"
    switch = ["How much does Kestrel Plus cost?", "Thanks. How do I connect the thermostat to Alexa?"]
    # a new topic outweighs the old
    assert retriever.search_conversations([switch])[0][0].source == "voice-assistants.md"
    last_only = experiment.model_copy(update={"rag": experiment.rag.model_copy(update={"history_turns": 0})})
    assert rag.Retriever(last_only, run).search_conversations([follow_up])[0][0].source == alone[0].source


def test_reload_in_a_new_process_gives_identical_hits(built):
    experiment, run, _ = built
    question = "How do I cancel Kestrel Plus?"
    here = [h.to_json() for h in rag.Retriever(experiment, run).search([question])[0]]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "rag",
            "query",
            str(QUICKSTART),
            "--json",
            question,
            "--run-dir",
            str(run.path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout)
    assert [h["chunk_id"] for h in there] == [h["chunk_id"] for h in here]
    assert [h["score"] for h in there] == pytest.approx([h["score"] for h in here], abs=1e-5)
    assert set(there[0]) == {"source", "score", "text", "chunk_id"} and there[0]["source"] == "kestrel-plus.md"


def test_query_on_a_new_run_builds_the_index_first_and_keeps_stdout_json(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "rag",
            "query",
            str(QUICKSTART),
            "--json",
            "What does E3 mean?",
            "--run-dir",
            str(tmp_path / "new"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "building the retriever index" in out.stderr
    assert json.loads(out.stdout)[0]["source"] == "error-codes.md"
    assert (tmp_path / "new" / "rag" / "index.faiss").exists()


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


def test_rag_training_examples_match_what_a_rag_system_sends_at_inference(built, smollm_location):
    """data.rag: prepare puts the passages into the last user turn exactly as a +rag system does when answering."""
    from types import SimpleNamespace

    from tuneforge.data.prepare import prepare
    from tuneforge.data.prepared import load_prepared
    from tuneforge.models import load_tokenizer
    from tuneforge.systems import LocalSystem, Spec

    _, run, _ = built
    experiment = load_experiment(QUICKSTART)  # the quickstart trains with passages (data.rag: true)
    assert experiment.data.rag
    tokenizer = load_tokenizer(experiment.model)
    report = prepare(experiment, run, tokenizer=tokenizer, progress=False, retrieve=rag.augment_examples)
    assert report["rag"]["augmented"] == report["counts"]["train"] + report["counts"]["valid"]
    examples = load_prepared(run.sub("data"), "train")
    example = examples[0]
    users = [i for i, m in enumerate(example.messages) if m["role"] == "user"]
    assert rag.OPEN in example.messages[users[-1]]["content"] and "source: " in example.messages[users[-1]]["content"]
    assert all(rag.OPEN not in example.messages[i]["content"] for i in users[:-1])  # history stays plain
    assert len(example.meta["rag_sources"]) == experiment.rag.k
    # the same question through the inference path gives the same user turn
    originals = [
        json.loads(line) for line in (REPO / "examples/data/support/conversations.jsonl").read_text().splitlines()
    ]
    question = example.messages[users[-1]]["content"].rsplit("Question: ", 1)[1].split("\nAnswer from the passages")[0]
    source = next(
        o["messages"] for o in originals if any(m["role"] == "user" and m["content"] == question for m in o["messages"])
    )
    # a +rag system's own retrieval step; only the engine's tokenizer takes part in it
    system = LocalSystem(
        Spec("base+rag", "base", True), SimpleNamespace(tokenizer=tokenizer), rag.Retriever(experiment, run)
    )
    upto = max(i for i, m in enumerate(source) if m["role"] == "user" and m["content"] == question)
    (inference,), _ = system.retrieve([source[: upto + 1]])
    assert inference[-1]["content"] == example.messages[users[-1]]["content"]
    assert "Retrieval-augmented examples" in run.sub("data", "report.md").read_text()


def test_index_is_rebuilt_when_the_corpus_changes(tmp_path):
    import shutil

    kb = tmp_path / "kb"
    shutil.copytree(REPO / "examples/data/support/kb", kb)
    experiment = load_experiment(QUICKSTART, [f"rag.corpus={kb}"])
    run = RunDir(experiment, tmp_path / "run")
    rag.ensure_index(experiment, run, progress=False)
    built_at = run.sub("rag", "index.json").stat().st_mtime_ns
    rag.ensure_index(experiment, run, progress=False)
    assert run.sub("rag", "index.json").stat().st_mtime_ns == built_at  # unchanged corpus: reused
    (kb / "new-page.md").write_text(
        "# Loyalty points\nEvery Kestrel K2 owner earns 12 loyalty points per month of use.\n"
    )
    hits = rag.ensure_index(experiment, run, progress=False).search(["How many loyalty points do I earn?"])[0]
    assert hits[0].source == "new-page.md"


def test_the_prepared_training_data_as_corpus(tmp_path, smollm_location):
    from tuneforge.data.prepare import prepare
    from tuneforge.data.prepared import load_prepared
    from tuneforge.models import load_tokenizer

    experiment = load_experiment(QUICKSTART, ["rag.corpus=train", "data.rag=false"])
    run = RunDir(experiment, tmp_path / "run")
    with pytest.raises(TuneforgeError, match="run `tuneforge prepare` first"):
        rag.build(experiment, run, progress=False)
    prepare(experiment, run, tokenizer=load_tokenizer(experiment.model), progress=False)
    summary = rag.build(experiment, run, progress=False)
    assert summary["documents"] == len(run.sub("data", "train.jsonl").read_text().splitlines())
    example = load_prepared(run.sub("data"), "train")[5]
    question = next(m["content"] for m in example.messages if m["role"] == "user")
    hit = rag.Retriever(experiment, run).search([question])[0][0]
    assert hit.source == example.id and question in hit.text  # the example itself, found by its own question
