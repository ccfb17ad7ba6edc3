"""Tool-calling records on real published chat templates (#33): what each trains, and what each cannot write.

Each template (tests/data/templates/, their origin in the README there) is rendered by the tiny in-memory tokenizer
with that model's special tokens, so a mask can be compared with the exact text the template writes: a call turn
must train exactly the call as the template renders it plus the end-of-turn token, a reply its text plus the
end-of-turn token, and nothing of the user's or the tool's turns. tests/integration/test_tool_templates_real.py
does the same on real vocabularies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tool_chats import (
    ASK,
    CALL_ORDER,
    CALL_TEXT,
    HERMES3,
    LLAMA31,
    MISTRAL,
    ORDER_CALL,
    QWEN25,
    RECORDS,
    SYSTEM,
    TOOLS,
    TWO_CALLS,
    check_inference_prompts,
    expected_runs,
    learned_runs,
    template,
)
from tuneforge.data.chat import ChatEncoder, TemplateRefusal

from ..conftest import make_tokenizer

MISTRAL_SPECIALS = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")
SPECIALS = {  # template: (bos, eos, special tokens), as the model's tokenizer has them
    MISTRAL: ("<s>", "</s>", (*MISTRAL_SPECIALS, "[TOOL_RESULTS]", "[/TOOL_RESULTS]")),
    LLAMA31: (
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
    ),
    HERMES3: ("<|begin_of_text|>", "<|im_end|>", ("<|begin_of_text|>",)),  # <|im_start|>, <|im_end|>: the helper's
    QWEN25: ("<|im_start|>", "<|im_end|>", ()),
}


def _encoder(name: str) -> ChatEncoder:
    bos, eos, specials = SPECIALS[name]
    return ChatEncoder(make_tokenizer(template(name), bos, eos, specials))


@pytest.mark.parametrize("record", sorted(RECORDS))
@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_each_call_and_reply_trains_exactly_as_the_template_writes_it(name, record):
    encoder = _encoder(name)
    messages = RECORDS[record]
    runs = learned_runs(encoder, messages)
    assert runs == expected_runs(name, messages)  # so nothing of the user's or the tool's turns is learned
    check_inference_prompts(encoder, messages)


def test_mistral_trains_each_turn_with_the_system_prompt_and_tools_where_inference_puts_them():
    encoder = _encoder(MISTRAL)
    support = RECORDS["support"]
    assert SYSTEM["content"] not in encoder.render(support, tools=TOOLS)  # the trap: the whole loses the system prompt
    (sequences,) = encoder.encode_examples([support], [TOOLS])
    assert len(sequences) == 2
    first = encoder.tokenizer.decode(sequences[0].input_ids)
    assert first.endswith(f"[INST]{SYSTEM['content']}\n\n{ASK['content']}[/INST]{CALL_TEXT[MISTRAL][0]}</s>")
    (sequences,) = encoder.encode_examples([RECORDS["greeted"]], [TOOLS])
    first = encoder.tokenizer.decode(sequences[0].input_ids)  # the greeting's: tools and system prompt at "Hello"
    assert first.startswith("<s>[AVAILABLE_TOOLS][")
    assert first.endswith(f"[/AVAILABLE_TOOLS][INST]{SYSTEM['content']}\n\nHello[/INST]Hello! How can I help?</s>")


def test_a_required_call_is_started_as_each_template_writes_calls():
    expected = {MISTRAL: '[TOOL_CALLS][{"name": "', LLAMA31: '{"name": "', HERMES3: '<tool_call>\n{"name": "'}
    for name, start in {**expected, QWEN25: expected[HERMES3]}.items():
        assert _encoder(name).call_prefix(TOOLS, "required") == start, name


def _refused(name: str, messages: list[dict], tools: list | None) -> str:
    with pytest.raises(TemplateRefusal) as info:
        _encoder(name).encode_examples([messages], [tools])
    return str(info.value)


def test_a_record_the_template_refuses_names_the_message_and_quotes_the_template():
    text = _refused(LLAMA31, TWO_CALLS, TOOLS)
    assert "refuses message 3 (assistant, 2 tool calls)" in text
    assert 'saying "This model only supports single tool-calls at once!"' in text
    openai_id = {**CALL_ORDER, "tool_calls": [{**ORDER_CALL, "id": "call_Vx3kP0aQ2"}]}
    text = _refused(MISTRAL, [SYSTEM, ASK, openai_id], TOOLS)
    assert "refuses message 3 (assistant, 1 tool call)" in text
    assert "Tool call IDs should be alphanumeric strings with length 9!" in text
    bare = {k: v for k, v in TOOLS[0]["function"].items() if k != "description"}
    text = _refused(HERMES3, RECORDS["support"], [{"type": "function", "function": bare}])
    assert "refuses the record's tools list" in text and "'dict object' has no attribute 'description'" in text
    # Hermes' tool_use template is for requests with tools: it writes nothing without them
    assert "refuses a record without tools" in _refused(HERMES3, [ASK, {"role": "assistant", "content": "Hi."}], None)
    assert "model.chat_template" in text  # the way out


def _experiment(folder: Path, data: str):
    from tuneforge.config import load_experiment
    from tuneforge.run import RunDir

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.yaml"
    path.write_text(f"name: t\nmodel: {{ref: builtin:smollm2-135m-instruct}}\ndata:\n{data}\n", encoding="utf-8")
    exp = load_experiment(path)
    return exp, RunDir(exp, folder / "run").start("prepare")


def test_prepare_names_each_record_the_template_cannot_write(tmp_path):
    from tuneforge.data.prepare import DataError, prepare

    records = [RECORDS["support"], RECORDS["chained"], TWO_CALLS, RECORDS["greeted"]]
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "tools": TOOLS}) + "\n" for m in records), encoding="utf-8")
    tokenizer = _encoder(LLAMA31).tokenizer
    data = f"  train: {path}\n  valid_split: 0\n  max_length: 8192"  # Llama-3.1 lists the tools at length
    exp, run = _experiment(tmp_path / "error", data)
    with pytest.raises(DataError) as info:
        prepare(exp, run, tokenizer=tokenizer, progress=False)
    (line,) = [row for row in str(info.value).splitlines() if "calls.jsonl" in row]
    assert line.strip().startswith("calls.jsonl line 3: [template_refused] the chat template refuses message 3")
    assert "single tool-calls at once!" in line
    exp, run = _experiment(tmp_path / "drop", data + "\n  on_invalid: drop")
    report = prepare(exp, run, tokenizer=tokenizer, progress=False)
    assert report["counts"] == {"train": 3, "valid": 0, "rejected": 1}
    (rejected,) = [json.loads(x) for x in run.sub("data", "rejected.jsonl").read_text().splitlines()]
    assert rejected["where"] == "calls.jsonl line 3" and rejected["problems"][0]["code"] == "template_refused"
