"""Preference pairs: OpenAI's DPO lines and TRL's prompt/chosen/rejected, checked and written back in OpenAI's
format."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_prepare import experiment, run_prepare, write_lines
from tuneforge.data.chat import ChatEncoder
from tuneforge.data.prepare import DataError, prepare
from tuneforge.data.prepared import load_prepared

SYSTEM = {"role": "system", "content": "Be brief."}


def pair(question="What is two plus two?", good="Four.", bad="Five."):
    return {
        "input": {"messages": [SYSTEM, {"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def test_openai_legacy_and_trl_pairs_become_the_same_prepared_lines(tmp_path, tiny_tokenizer):
    openai = write_lines(tmp_path / "o.jsonl", [pair(), pair("Capital of France?", "Paris.", "Lyon.")])
    legacy = write_lines(
        tmp_path / "l.jsonl",
        [
            {
                "input": pair()["input"],
                "preferred_completion": pair()["preferred_output"],
                "non_preferred_completion": pair()["non_preferred_output"],
            },
            {
                "input": pair("Capital of France?")["input"],
                "preferred_completion": [{"role": "assistant", "content": "Paris."}],
                "non_preferred_completion": [{"role": "assistant", "content": "Lyon."}],
            },
        ],
    )
    trl = write_lines(
        tmp_path / "t.jsonl",
        [
            {
                "prompt": [SYSTEM, {"role": "user", "content": "What is two plus two?"}],
                "chosen": [{"role": "assistant", "content": "Four."}],
                "rejected": [{"role": "assistant", "content": "Five."}],
            },
            {
                "prompt": [SYSTEM, {"role": "user", "content": "Capital of France?"}],
                "chosen": "Paris.",
                "rejected": "Lyon.",
            },
        ],
    )
    written = []
    for path in (openai, legacy, trl):
        (tmp_path / path.stem).mkdir()
        report, run = run_prepare(tmp_path / path.stem, tiny_tokenizer, f"  train: {path}\n  valid_split: 0")
        assert report["counts"]["train"] == 2 and report["tokens"]["train"]["pairs"] == 2
        written.append(sorted(run.sub("data", "train.jsonl").read_text().splitlines()))
    assert written[0] == written[1] == written[2]
    lines = [json.loads(x) for x in written[0]]
    assert {tuple(sorted(line)) for line in lines} == {
        ("input", "non_preferred_output", "preferred_output")
    }  # OpenAI's DPO shape
    back = load_prepared(run.sub("data"), "train")
    assert {e.rejected["content"] for e in back} == {"Five.", "Lyon."}
    assert {e.messages[-1]["content"] for e in back} == {"Four.", "Paris."}


def test_each_broken_pair_is_named_by_line_and_code_and_nothing_is_written(tmp_path, tiny_tokenizer):
    ok = pair()
    lines = [
        ok,  # 1 fine
        {"input": ok["input"], "non_preferred_output": ok["non_preferred_output"]},  # 2 no preferred output
        {**ok, "preferred_output": ok["preferred_output"] * 2},  # 3 two outputs
        {**ok, "non_preferred_output": [{"role": "user", "content": "Five."}]},  # 4 not the assistant's
        {**ok, "input": {"messages": []}},  # 5 empty input
        {**ok, "preferred_output": [{"role": "assistant", "content": "  "}]},  # 6 empty answer
        {
            **ok,
            "input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        },  # 7 ends with an answer
        {"prompt": "", "chosen": "a", "rejected": "b"},  # 8 empty TRL prompt
        {
            **ok,
            "input": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        },  # 9 role order
    ]
    path = write_lines(tmp_path / "p.jsonl", lines)
    exp, run = experiment(tmp_path, f"  train: {path}\n  format: preference")
    with pytest.raises(DataError) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    named = {}
    for row in str(info.value).splitlines():
        if "p.jsonl line" in row:
            named.setdefault(int(row.split("p.jsonl line ")[1].split(":")[0]), set()).add(
                row.split("[")[1].split("]")[0]
            )
    assert named == {
        2: {"preference_missing_output"},
        3: {"preference_output_count"},
        4: {"preference_output_not_assistant"},
        5: {"preference_empty_input"},
        6: {"preference_empty_output"},
        7: {"preference_input_ends_with_assistant"},
        8: {"preference_empty_input"},
        9: {"role_order"},
    }
    assert not run.sub("data").exists()


def test_a_pair_is_detected_counted_with_both_answers_and_cut_to_the_same_prompt(tmp_path, tiny_tokenizer):
    long_question = "Tell me about the weather. " * 60
    path = write_lines(
        tmp_path / "p.jsonl", [pair(), pair(long_question, "Sunny, mostly.", "I do not know anything about that.")]
    )
    report, run = run_prepare(
        tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0\n  max_length: 96\n  overflow: truncate"
    )
    tokens = report["tokens"]["train"]
    assert tokens["pairs"] == 2 and tokens["truncated"] == 1 and tokens["max"] <= 96
    (cut,) = [e for e in load_prepared(run.sub("data"), "train") if "weather" in e.messages[1]["content"]]
    assert cut.messages[1]["content"].endswith("…") and "weight" not in cut.messages[1]
    encoder = ChatEncoder(tiny_tokenizer)
    sides = [encoder.encode(cut.messages), encoder.encode(cut.messages[:-1] + [cut.rejected])]
    assert all(len(s.input_ids) <= 96 for s in sides)  # both answers follow the one shortened prompt
    first = [i for i, keep in enumerate(sides[0].supervised) if keep][0]
    assert sides[0].input_ids[:first] == sides[1].input_ids[:first]


def test_dpo_needs_pairs_and_lora():
    from tuneforge.config import Experiment

    with pytest.raises(Exception, match="train.method: dpo trains on preference pairs"):
        Experiment.model_validate({"name": "x", "data": {"format": "messages"}, "train": {"method": "dpo"}})
    with pytest.raises(Exception, match="full_finetune: false"):
        Experiment.model_validate(
            {"name": "x", "model": {"quantization": "none"}, "train": {"method": "dpo", "full_finetune": True}}
        )
