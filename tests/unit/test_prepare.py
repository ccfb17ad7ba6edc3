"""`prepare`: every kind of broken line named with its code, formats, tables, policies, report."""

from __future__ import annotations

import json

import pytest

from tuneforge.config import load_experiment
from tuneforge.data.prepare import DataError, prepare
from tuneforge.data.prepared import load_prepared
from tuneforge.errors import ConfigError
from tuneforge.run import RunDir

SYSTEM = {"role": "system", "content": "Be brief."}


def chat(user="What is two plus two?", answer="Four."):
    return {"messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def experiment(tmp_path, data: str, extra: str = ""):
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: t\nmodel: {{ref: builtin:smollm2-135m-instruct}}\ndata:\n{data}\n{extra}", encoding="utf-8")
    exp = load_experiment(path)
    return exp, RunDir(exp, tmp_path / "run").start("prepare")


def run_prepare(tmp_path, tokenizer, data, extra=""):
    exp, run = experiment(tmp_path, data, extra)
    return prepare(exp, run, tokenizer=tokenizer, progress=False), run


def write_lines(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line)
            fh.write(line if isinstance(line, bytes) else line.encode())
            fh.write(b"\n")
    return path


def test_each_broken_line_is_named_with_its_code_and_nothing_is_written(tmp_path, tiny_tokenizer):
    lines = [
        chat(),  # 1 fine
        '{"messages": [',  # 2 invalid JSON
        b'{"messages": "\xff\xfe"}',  # 3 bad UTF-8
        '["not", "an", "object"]',  # 4 not an object
        {"prompt": "hi", "completion": "there"},  # 5 no messages list (+ unknown keys, warnings)
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},  # 6 message missing role
        # 7 unrecognised key
        {"messages": [{"role": "user", "content": "hi", "mood": "x"}, {"role": "assistant", "content": "yo"}]},
        # 8 unrecognised role
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]},  # 9 missing content
        {"messages": [{"role": "user", "content": "hi"}]},  # 10 no assistant
        # 11 order
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        chat("fine again"),  # 12 fine
        "",  # 13 blank: skipped
    ]
    path = write_lines(tmp_path / "broken.jsonl", lines)
    exp, run = experiment(tmp_path, f"  train: {path}")
    with pytest.raises(DataError) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    text = str(info.value)
    expected = {
        2: "invalid_json",
        3: "bad_utf8",
        4: "data_type",
        5: "missing_messages_list",
        6: "message_missing_key",
        7: "message_unrecognized_key",
        8: "unrecognized_role",
        9: "missing_content",
        10: "example_missing_assistant_message",
        11: "role_order",
    }
    named = {}
    for row in text.splitlines():
        if "broken.jsonl line" in row:
            number = int(row.split("broken.jsonl line ")[1].split(":")[0])
            named.setdefault(number, set()).add(row.split("[")[1].split("]")[0])
    assert set(named) == set(expected)
    for number, code in expected.items():
        assert code in named[number], (number, named[number])
    assert not run.sub("data").exists()


def test_warnings_keep_the_record(tmp_path, tiny_tokenizer):
    rec = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"},
        ],
        "extra": 1,
    }
    path = write_lines(tmp_path / "w.jsonl", [rec, chat(), chat("b"), chat("c")])
    report, _ = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0")
    assert report["counts"]["train"] == 4
    assert report["problems"]["by_code"] == {"record_unrecognized_key": 1, "last_not_assistant": 1}


def test_drop_invalid_writes_rejected_with_reasons(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [chat("a"), "{oops", chat("b"), {"messages": []}, chat("c")])
    report, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  on_invalid: drop\n  valid_split: 0")
    assert report["counts"] == {"train": 3, "valid": 0, "rejected": 2}
    rejected = [json.loads(x) for x in run.sub("data", "rejected.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejected] == ["d.jsonl line 2", "d.jsonl line 4"]
    assert [r["problems"][0]["code"] for r in rejected] == ["invalid_json", "missing_messages_list"]


def test_alpaca_sharegpt_and_json_array_become_the_same_messages(tmp_path, tiny_tokenizer):
    alpaca = write_lines(
        tmp_path / "a.jsonl",
        [{"instruction": "Add", "input": "2 and 2", "output": "4"}, {"instruction": "Say hi", "output": "hi"}],
    )
    share = write_lines(
        tmp_path / "s.jsonl",
        [
            {"conversations": [{"from": "human", "value": "Add\n\n2 and 2"}, {"from": "gpt", "value": "4"}]},
            {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
        ],
    )
    array = tmp_path / "m.json"
    array.write_text(
        json.dumps(
            [
                {"messages": [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]},
                {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
            ]
        )
    )
    outputs = []
    for i, path in enumerate([alpaca, share, array]):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        _, run = run_prepare(sub, tiny_tokenizer, f"  train: {path}\n  valid_split: 0")
        outputs.append(run.sub("data", "train.jsonl").read_text())
    assert outputs[0] == outputs[1] == outputs[2]
    assert json.loads(outputs[0].splitlines()[0])["messages"][0]["content"] == "Add\n\n2 and 2"


MESSY = (
    ",product,review ,rating\n"
    '0,  Kettle ,"Boils fast, &amp; quiet. It&#039;s great",5\n'
    '1,Kettle,"Spans\ntwo lines",4\n'
    "2,Lamp,,1\n"  # empty review: dropped
    '3,Lamp,"Too  dim\tat night",\n'  # empty rating: filled
    '4,Kettle,"Spans\ntwo lines",4\n'  # duplicate of row 2 (index differs)
    '5,Fan,"Loud ""rattle"" noise",2\n'
)


def test_messy_table_loads_without_hand_editing(tmp_path, tiny_tokenizer):
    table = tmp_path / "reviews.csv"
    table.write_text(MESSY, encoding="utf-8")
    data = f"""  train: {table}
  template:
    system: "Rate the review."
    user: "Product: {{product}}\\nReview: {{review}}"
    assistant: "{{rating}}"
  label: rating
  clean: {{drop_empty: [review], fill_empty: {{rating: unknown}}}}
  valid_split: 0"""
    report, run = run_prepare(tmp_path, tiny_tokenizer, data)
    stages = {s["stage"]: s for s in report["stages"]["train"]}
    assert stages["read"]["count"] == 6
    assert stages["empty review (dropped)"]["removed"] == 1
    assert stages["exact duplicates"]["removed"] == 1
    assert report["counts"]["train"] == 4
    assert report["cleaning"]["html_entities_unescaped"] == 1
    assert report["cleaning"]["empty_cells_filled"] == {"rating": 1}
    examples = load_prepared(run.sub("data"), "train")
    users = [e.messages[1]["content"] for e in examples]
    assert users[0] == "Product: Kettle\nReview: Boils fast, & quiet. It's great"
    assert users[1] == "Product: Kettle\nReview: Spans\ntwo lines"
    assert users[2] == "Product: Lamp\nReview: Too dim at night"
    assert users[3] == 'Product: Fan\nReview: Loud "rattle" noise'
    assert [e.label for e in examples] == ["5", "4", "unknown", "2"]
    assert [e.where for e in examples] == [
        "reviews.csv row 1",
        "reviews.csv row 2",
        "reviews.csv row 4",
        "reviews.csv row 6",
    ]


def test_template_column_typo_is_named(tmp_path, tiny_tokenizer):
    table = tmp_path / "reviews.csv"
    table.write_text(MESSY, encoding="utf-8")
    exp, run = experiment(tmp_path, f"  train: {table}\n  template: {{user: '{{reviw}}', assistant: '{{ratin}}'}}")
    with pytest.raises(ConfigError) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    problems = info.value.problems
    assert len(problems) == 2
    assert "data.template.user names column 'reviw'" in problems[0] and "did you mean 'review'" in problems[0]
    assert "data.template.assistant names column 'ratin'" in problems[1]


def test_empty_answer_cell_is_an_error_with_a_fix(tmp_path, tiny_tokenizer):
    table = tmp_path / "t.csv"
    table.write_text("q,a\nhello,world\nbye,\n", encoding="utf-8")
    exp, run = experiment(tmp_path, f"  train: {table}\n  template: {{user: '{{q}}', assistant: '{{a}}'}}")
    with pytest.raises(DataError, match=r"t.csv row 2: \[missing_content\].*drop_empty"):
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)


def test_length_policies(tmp_path, tiny_tokenizer):
    long_user = "positive negative " * 60
    path = write_lines(tmp_path / "l.jsonl", [chat(long_user, "positive"), chat("short", "negative")])
    report, _ = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0\n  max_length: 64")
    assert report["counts"]["train"] == 1 and report["problems"]["by_code"] == {"too_long_dropped": 1}

    (tmp_path / "t").mkdir()
    report, run = run_prepare(
        tmp_path / "t", tiny_tokenizer, f"  train: {path}\n  valid_split: 0\n  max_length: 64\n  overflow: truncate"
    )
    assert report["counts"]["train"] == 2 and report["tokens"]["train"]["truncated"] == 1
    assert report["tokens"]["train"]["max"] <= 64 and report["tokens"]["train"]["missing_end_of_turn"] == 0
    shortened = load_prepared(run.sub("data"), "train")[0]
    assert shortened.messages[-1]["content"] == "positive"  # the answer survives, the review was cut
    assert len(shortened.messages[1]["content"]) < len(long_user)

    (tmp_path / "e").mkdir()
    exp, run = experiment(tmp_path / "e", f"  train: {path}\n  max_length: 64\n  overflow: error")
    with pytest.raises(DataError, match=r"l.jsonl line 1: \[too_long\]"):
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)


def test_zero_trainable_tokens_is_rejected(tmp_path, tiny_tokenizer):
    # Nothing in the prompt is long enough to shorten, so truncation cuts the answer away entirely.
    short = {
        "messages": [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]
    }
    path = write_lines(tmp_path / "z.jsonl", [short])
    exp, run = experiment(tmp_path, f"  train: {path}\n  max_length: 9\n  overflow: truncate")
    with pytest.raises(DataError, match=r"z.jsonl line 1: \[no_trainable_tokens\]"):
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)


def test_split_is_seeded_and_stratified(tmp_path, tiny_tokenizer):
    records = [
        dict(chat(f"review {i}", "positive" if i % 4 else "negative"), label="positive" if i % 4 else "negative")
        for i in range(40)
    ]
    path = write_lines(tmp_path / "s.jsonl", records)
    first, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0.25")
    valid_a = run.sub("data", "valid.meta.jsonl").read_text()
    second, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0.25")
    assert run.sub("data", "valid.meta.jsonl").read_text() == valid_a
    assert first["labels"]["valid"]["counts"] == {"negative": 2, "positive": 8}
    assert first["labels"]["train"]["counts"] == {"negative": 8, "positive": 22}
    other, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0.25", extra="seed: 7\n")
    assert run.sub("data", "valid.meta.jsonl").read_text() != valid_a


def test_report_counts_tokens_and_estimates(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "r.jsonl", [chat(f"q{i}", "Four.") for i in range(20)])
    report, run = run_prepare(
        tmp_path,
        tiny_tokenizer,
        f"  train: {path}\n  valid_split: 0",
        extra="train: {backend: openai, price_per_1m_tokens: 10.0}\n",
    )
    tokens = report["tokens"]["train"]
    encoded = [
        len(tiny_tokenizer.apply_chat_template(chat(f"q{i}")["messages"], tokenize=True)["input_ids"])
        for i in range(20)
    ]
    assert tokens["total"] == sum(encoded) and tokens["max"] == max(encoded)
    assert 0 < tokens["trainable_share"] < 0.5
    openai = report["openai"]
    assert openai["n_epochs"] == 5  # 20 examples: OpenAI's auto rule raises epochs to reach 100 example passes
    # billed tokens are counted with the hosted model's encoding (gpt-4o-mini: o200k_base), not the local tokenizer
    import tiktoken

    o200k = tiktoken.get_encoding("o200k_base")  # the estimate above put it in tiktoken's cache, offline
    hosted = [
        sum(3 + len(o200k.encode(m["role"])) + len(o200k.encode(m["content"])) for m in chat(f"q{i}")["messages"]) + 3
        for i in range(20)
    ]
    assert openai["tokenizer"] == "o200k_base" and sum(hosted) != sum(encoded)
    assert openai["billed_tokens"] == 5 * sum(hosted)
    assert openai["estimated_cost_usd"] == pytest.approx(5 * sum(hosted) / 1e6 * 10.0, rel=1e-3)
    assert run.sub("data", "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "OpenAI fine-tuning estimate" in run.sub("data", "report.md").read_text()
    manifest = json.loads(run.manifest_path.read_text())
    assert len(manifest["data"]["sha256"]["train.jsonl"]) == 64


def test_step_estimate_counts_the_rows_the_trainer_packs(tmp_path):
    from tuneforge.data.packing import build_rows
    from tuneforge.data.records import Example
    from tuneforge.data.report import local_plan

    exp, _ = experiment(
        tmp_path,
        "  train: x.jsonl\n  max_length: 100",
        extra="train: {micro_batch_size: 2, grad_accum: 1, epochs: 3, packing: true}\n",
    )
    lengths = [60] * 9 + [30, 25]  # two 60s never share a row: dividing total tokens by 100 would say 7 rows
    examples = [Example(messages=[], id=str(i), where="", n_tokens=n, n_trainable=20) for i, n in enumerate(lengths)]
    rows = build_rows([([0] * n, [0] * n) for n in lengths], 100, packing=True, seed=exp.seed)
    plan = local_plan(examples, exp, has_valid=True)
    assert plan["rows"] == len(rows) == 9
    assert plan["steps"] == 3 * 5


def test_failed_prepare_keeps_previous_output(tmp_path, tiny_tokenizer):
    good = write_lines(tmp_path / "g.jsonl", [chat("a"), chat("b"), chat("c")])
    _, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {good}")
    before = run.sub("data", "train.jsonl").read_text()
    bad = write_lines(tmp_path / "b.jsonl", [chat("a"), "{broken"])
    exp, run = experiment(tmp_path, f"  train: {bad}")
    with pytest.raises(DataError):
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    assert run.sub("data", "train.jsonl").read_text() == before


def test_hub_name_offline_is_a_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    from tuneforge.errors import TuneforgeError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp, run = experiment(tmp_path, "  train: someorg/some-dataset")
    with pytest.raises(TuneforgeError, match="hub is off"):
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)


def test_json_errors_name_the_right_column(tmp_path):
    from tuneforge.data.sources import read_json_records

    lines = [
        '{"messages": [{"role": "user", "content": "hi"}]}',
        '{"messages": [{"role": "user"',
        '{"messages": [{"role": "user", "content": "cut}]}',
    ]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = [str(r.problem) for r in read_json_records(path) if r.problem]
    expected = []
    for number, line in enumerate(lines, 1):  # Python's own column for each line on its own
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            expected.append((number, exc.colno))
    assert [(2, 30), (3, 43)] == expected
    assert problems == [
        "cut.jsonl line 2: [invalid_json] Expecting ',' delimiter at column 30",
        "cut.jsonl line 3: [invalid_json] Unterminated string starting at column 43",
    ]


def test_prompts_get_the_message_checks_of_training_data():
    from tuneforge.data.validate import check_prompt, text_content

    assert check_prompt([{"role": "user", "content": "hi"}], "x") == []
    assert [p.code for p in check_prompt([{"role": "human", "content": "hi"}], "p.jsonl line 1")] == [
        "unrecognized_role"
    ]
    assert [
        p.code for p in check_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "x")
    ] == ["role_order"]
    parts = text_content(
        [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    )
    assert parts == [{"role": "user", "content": "Hello there"}] and check_prompt(parts, "x") == []
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert [p.code for p in check_prompt(text_content(image), "x")] == ["missing_content"]


LATIN = "question,answer\nWhat is a café?,A place for coffee. Très bien.\nNaïve?,Yes — très naïve.\nÜber?,Straße.\n"


def test_a_latin1_table_is_detected_read_right_and_reported(tmp_path, tiny_tokenizer):
    table = tmp_path / "excel.csv"
    table.write_bytes(LATIN.encode("cp1252"))  # what Excel writes in Western locales
    report, run = run_prepare(
        tmp_path,
        tiny_tokenizer,
        f"  train: {table}\n  valid_split: 0\n  template: {{user: '{{question}}', assistant: '{{answer}}'}}",
    )
    rows = [json.loads(line) for line in run.sub("data", "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["messages"][-1]["content"] for r in rows} == {
        "A place for coffee. Très bien.",
        "Yes — très naïve.",
        "Straße.",
    }
    note = report["cleaning"]["encoding"]["excel.csv"]
    assert note.startswith("cp1252 ") and "line 2, column 14, byte 29" in note  # the first non-UTF-8 byte: 'é' of café


def test_a_wrong_explicit_encoding_names_line_and_column(tmp_path, tiny_tokenizer):
    table = tmp_path / "excel.csv"
    table.write_bytes(LATIN.encode("cp1252"))
    exp, run = experiment(
        tmp_path, f"  train: {table}\n  encoding: utf-8\n  template: {{user: '{{question}}', assistant: '{{answer}}'}}"
    )
    with pytest.raises(Exception) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    assert "excel.csv is not utf-8 text at line 2, column 14, byte 29" in str(info.value)
    assert not run.sub("data").exists()


def test_utf8_past_the_first_block_and_a_bom_stay_utf8(tmp_path):
    from tuneforge.data import tables

    big = tmp_path / "big.csv"
    big.write_text(
        "q,a\n" + "plain,row\n" * 200_000 + "naïve,é\n", encoding="utf-8"
    )  # the first non-ASCII byte is past 1 MiB
    assert tables.detect_encoding(big)[0] == "utf-8"
    late = tmp_path / "late.csv"
    late.write_bytes(("q,a\n" + "plain,row\n" * 200_000).encode() + "naïve,é\n".encode("cp1252"))
    codec, found = tables.detect_encoding(late)
    assert codec == "cp1252" and "line 200002, column 3" in found
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + b"q,a\nx,y\n")
    assert tables.detect_encoding(bom)[0] == "utf-8-sig"


def test_ragged_rows_are_reported_not_silently_padded(tmp_path, tiny_tokenizer):
    table = tmp_path / "ragged.csv"
    table.write_text('q,a\nq1,a1\nq2,a2,EXTRA\n\n"q3, quoted",a3\nq4\nq5,a5\n', encoding="utf-8")
    data = f"  train: {table}\n  valid_split: 0\n  template: {{user: '{{q}}', assistant: '{{a}}'}}"
    exp, run = experiment(tmp_path, data)
    with pytest.raises(DataError) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    text = str(info.value)
    assert "ragged.csv row 2: [ragged_row] line 3 has 3 fields where the header has 2" in text
    assert (
        "ragged.csv row 4: [ragged_row] line 6 has 1 field where the header has 2" in text
    )  # the blank line is not a row
    assert "row 3" not in text  # a quoted delimiter is one field
    report, run = run_prepare(
        tmp_path, tiny_tokenizer, data.replace("valid_split: 0", "valid_split: 0\n  on_invalid: drop")
    )
    assert report["counts"]["train"] == 3 and report["counts"]["rejected"] == 2
