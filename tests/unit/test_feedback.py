"""The feedback store (concurrent appends, crashes), the leaderboard and win rates, and the export mapping."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.feedback.export import export, preference, supervised
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.summary import bradley_terry, leaderboard, summarise, wilson

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does E3 mean?"}]


def _answer(system: str, text: str, identity: str = "") -> dict:
    return {"system": system, "identity": identity or f"id-{system}", "text": text, "sources": []}


def _vote(left: str, right: str, verdict: str, prompt: str = "What does E3 mean?", texts=("a", "b")) -> dict:
    return {
        "kind": "vote",
        "verdict": verdict,
        "messages": [{"role": "user", "content": prompt}],
        "left": _answer(left, texts[0]),
        "right": _answer(right, texts[1]),
    }


def _append_many(folder: str, worker: int, count: int) -> None:
    store = FeedbackStore(folder)
    for n in range(count):
        store.append(
            {
                "kind": "contribution",
                "messages": [{"role": "user", "content": f"w{worker} q{n} " + "x" * 3000}],
                "answer": f"answer {worker}-{n}",
                "login": f"user{worker}",
            }
        )


def test_concurrent_appends_from_several_processes_all_land_whole(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w, 40)) for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    records, problems = FeedbackStore(tmp_path).read()
    assert problems == [] and len(records) == 240 and len({r["id"] for r in records}) == 240
    assert {r["answer"] for r in records} == {f"answer {w}-{n}" for w in range(6) for n in range(40)}
    assert oct(os.stat(tmp_path / "feedback.jsonl").st_mode & 0o777) == "0o600"  # feedback stays the owner's


def test_a_write_cut_short_by_a_crash_loses_nothing_else(tmp_path):
    store = FeedbackStore(tmp_path)
    first = store.append(
        {"kind": "thumb", "value": "up", "messages": ASK, "answer": _answer("finetuned", "Low battery.")}
    )
    pid = os.fork()
    if pid == 0:  # a writer that dies halfway through its line
        with open(tmp_path / "feedback.jsonl", "ab") as out:
            out.write(b'{"kind": "thumb", "value": "do')
            out.flush()
        os._exit(1)
    os.waitpid(pid, 0)
    records, problems = store.read()
    assert [r["id"] for r in records] == [first["id"]] and "line 2: an unfinished write" in problems[0]
    second = store.append(
        {
            "kind": "correction",
            "messages": ASK,
            "answer": _answer("base", "Error."),
            "corrected": "E3: replace the batteries.",
        }
    )
    records, problems = store.read()
    assert [r["id"] for r in records] == [first["id"], second["id"]]  # the new line did not join the broken one
    assert len(problems) == 1 and "line 2" in problems[0]


@pytest.mark.parametrize(
    "record, where",
    [
        ({"kind": "like", "messages": ASK}, "'kind'"),
        ({"kind": "thumb", "value": "up", "messages": []}, "'messages'"),
        ({"kind": "thumb", "value": "sideways", "messages": ASK, "answer": _answer("base", "x")}, "'value'"),
        ({"kind": "correction", "messages": ASK, "answer": _answer("base", "x"), "corrected": "  "}, "'corrected'"),
        (
            {"kind": "vote", "verdict": "left", "messages": ASK, "left": _answer("a", "x"), "right": {"text": "y"}},
            "'right'",
        ),
        (
            {
                "kind": "vote",
                "verdict": "maybe",
                "messages": ASK,
                "left": _answer("a", "x"),
                "right": _answer("b", "y"),
            },
            "'verdict'",
        ),
    ],
)
def test_a_bad_record_is_refused_naming_the_key_and_nothing_is_written(tmp_path, record, where):
    with pytest.raises(TuneforgeError, match=where):
        FeedbackStore(tmp_path).append(record)
    assert not (tmp_path / "feedback.jsonl").exists()


def test_the_leaderboard_orders_systems_and_its_intervals_hold_the_ratings():
    votes = (
        [_vote("a", "b", "left")] * 8
        + [_vote("a", "b", "right")] * 2
        + [_vote("b", "c", "left")] * 8
        + [_vote("c", "b", "left")] * 2
        + [_vote("a", "c", "tie")]
    )
    summary = summarise(votes)
    board = summary["leaderboard"]
    assert [r["system"] for r in board] == ["a", "b", "c"]
    assert all(r["interval"][0] <= r["rating"] <= r["interval"][1] for r in board)
    assert board[0]["rating"] - board[1]["rating"] > 100  # 8 of 10 is about +240 on the Elo scale
    rates = {(r["a"], r["b"]): r for r in summary["win_rates"]}
    assert rates[("a", "b")]["a_win_rate"] == 0.8 and rates[("a", "b")]["a_wins"] == 8
    assert (
        rates[("b", "c")]["a_wins"] == 8 and rates[("b", "c")]["b_wins"] == 2
    )  # c's wins as the left side counted for c
    assert rates[("a", "c")]["ties"] == 1
    unbeaten = bradley_terry([("x", "y", 1.0, "left", "p")] * 5)
    assert all(abs(v) < 1e6 for v in unbeaten.values()) and unbeaten["x"] > unbeaten["y"]  # finite, thanks to the prior
    low, high = wilson(8, 10)
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943
    assert leaderboard([]) == []
    few = leaderboard([("x", "y", 1.0, "left", "p")] * 3)
    assert all(r["interval"] is None for r in few)  # three votes resample to themselves: no interval is claimed


def test_versions_of_one_system_are_told_apart_and_disagreement_is_found():
    old, new = _answer("finetuned", "x", "1111111111"), _answer("finetuned", "y", "2222222222")
    records = [
        {"kind": "vote", "verdict": "right", "messages": ASK, "left": old, "right": new},
        {"kind": "vote", "verdict": "left", "messages": ASK, "left": old, "right": new},
        {
            "kind": "vote",
            "verdict": "right",
            "messages": [{"role": "user", "content": "other"}],
            "left": old,
            "right": new,
        },
        {"kind": "thumb", "value": "down", "messages": ASK, "answer": old, "login": "ana"},
    ]
    summary = summarise(records)
    assert {r["system"] for r in summary["leaderboard"]} == {"finetuned@11111111", "finetuned@22222222"}
    assert summary["thumbs"] == {"finetuned@11111111": {"up": 0, "down": 1}} and summary["logins"] == ["ana"]
    (split,) = summary["disagreement"]
    assert split["prompt"] == "What does E3 mean?" and split["votes"] == 2 and split["entropy"] == 1.0


def test_export_maps_each_kind_and_writes_files_prepare_accepts(tmp_path):
    from tuneforge.data.preference import read_pair
    from tuneforge.data.sources import read_json_records
    from tuneforge.data.validate import check_record

    records = [
        {
            "kind": "contribution",
            "messages": [{"role": "user", "content": "How do I reset it?"}],
            "answer": "Hold the dial for 10 seconds.",
        },
        {
            "kind": "correction",
            "messages": ASK,
            "answer": _answer("base", "I am not sure."),
            "corrected": "E3 means low battery.",
        },
        {
            "kind": "thumb",
            "value": "up",
            "messages": ASK,
            "answer": _answer("finetuned", "Low battery: replace both AA cells."),
        },
        {"kind": "thumb", "value": "down", "messages": ASK, "answer": _answer("base", "Check the manual.")},
        _vote("base", "finetuned", "right", texts=("Check the manual.", "Low battery.")),
        _vote(
            "base", "finetuned", "right", texts=("Check the manual.", "Low battery.")
        ),  # the same line twice: written once
        _vote("base", "finetuned", "tie"),
        _vote("base", "finetuned", "both_bad"),
        _vote("base", "finetuned", "left", texts=("same", "same")),  # nothing to learn from
    ]
    sft = supervised(records)
    assert [line["messages"][-1]["content"] for line in sft] == [
        "Hold the dial for 10 seconds.",
        "E3 means low battery.",
        "Low battery: replace both AA cells.",
    ]
    assert sft[1]["messages"][:-1] == ASK  # the system prompt travels with the example
    pairs = preference(records)
    chosen = [(p["preferred_output"][0]["content"], p["non_preferred_output"][0]["content"]) for p in pairs]
    assert ("E3 means low battery.", "I am not sure.") in chosen  # a correction beats what it corrected
    assert ("Low battery.", "Check the manual.") in chosen  # the vote's winner
    assert ("Low battery: replace both AA cells.", "Check the manual.") in chosen  # thumbs up over thumbs down

    result = export(records, tmp_path)
    assert result["supervised"]["lines"] == 3 and result["preference"] == {
        **result["preference"],
        "lines": 3,
        "duplicates": 1,
        "invalid": 1,
    }
    for raw in read_json_records(tmp_path / "sft.jsonl"):
        assert not [p for p in check_record(raw.data, raw.where) if p.severity == "error"]
    for raw in read_json_records(tmp_path / "preference.jsonl"):
        assert read_pair(raw.data, raw.where)[0] is not None
    assert (
        json.loads((tmp_path / "preference.jsonl").read_text().splitlines()[0])["input"]["messages"][-1]["role"]
        == "user"
    )
