"""Tool calls: OpenAI's rules with codes, the legacy form, the <tool_call> convention's masks, and parsing back."""

from __future__ import annotations

import json

from tests.masks import supervised_runs
from tuneforge.data.chat import ChatEncoder
from tuneforge.data.tools import from_legacy, parse_tool_calls, same_call
from tuneforge.data.validate import check_record

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


def test_openai_s_documented_tool_example_is_accepted():
    assert check_record({"messages": CHAT, "tools": TOOLS, "parallel_tool_calls": False}, "x") == []


def test_each_tool_rule_has_its_code():
    def codes(record):
        return sorted(p.code for p in check_record(record, "t.jsonl:1") if p.severity == "error")

    broken_args = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert codes({"messages": CHAT[:2] + [{**CHAT[2], "tool_calls": [broken_args]}] + CHAT[3:], "tools": TOOLS}) == [
        "tool_call_arguments_not_json"
    ]
    not_json = {**CALL, "function": {"name": "get_weather", "arguments": "{city: Paris"}}
    assert codes({"messages": CHAT[:2] + [{**CHAT[2], "tool_calls": [not_json]}] + CHAT[3:]}) == [
        "tool_call_arguments_not_json"
    ]
    assert codes({"messages": CHAT[:3] + [{**CHAT[3], "tool_call_id": "call_9"}] + CHAT[4:]}) == [
        "tool_call_id_unknown"
    ]
    assert codes({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "get weather!"}}]}) == [
        "tool_call_unknown_function",
        "tools_invalid",
    ]
    assert codes(
        {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}
    ) == ["tool_call_unknown_function", "tools_invalid"]
    two = {**CHAT[2], "tool_calls": [CALL, {**CALL, "id": "call_2"}]}
    assert codes({"messages": CHAT[:2] + [two] + CHAT[3:], "parallel_tool_calls": False}) == ["tool_call_invalid"]
    assert codes({"messages": CHAT[:2] + [{**CHAT[2], "tool_calls": [{"type": "function"}]}] + CHAT[3:]}) == [
        "tool_call_id_unknown",
        "tool_call_invalid",
    ]
    stray = [CHAT[1], {"role": "assistant", "content": "Sure."}, CHAT[3], CHAT[4]]
    assert codes({"messages": stray}) == ["role_order", "tool_call_id_unknown"]


def test_the_legacy_functions_form_becomes_tools_and_tool_calls():
    legacy = {
        "functions": [TOOLS[0]["function"]],
        "messages": [
            CHAT[1],
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'},
            CHAT[4],
        ],
    }
    modern = from_legacy(legacy)
    assert modern["tools"] == TOOLS and "functions" not in modern
    assert modern["messages"][1]["tool_calls"][0]["function"] == CALL["function"]
    assert modern["messages"][2] == {
        "role": "tool",
        "tool_call_id": modern["messages"][1]["tool_calls"][0]["id"],
        "content": '{"temp_c": 21}',
    }
    assert check_record(modern, "x") == []


def test_chatml_convention_trains_the_call_and_the_answer_never_the_tool_output(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer)
    assert not encoder.native_tools
    encoded = encoder.encode(CHAT, TOOLS)
    text = tiny_tokenizer.decode(encoded.input_ids)
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_response>" in text
    runs = [tiny_tokenizer.decode(r) for r in supervised_runs(encoded.input_ids, encoded.supervised)]
    assert len(runs) == 2
    assert runs[0].startswith("<tool_call>") and runs[0].endswith("<|im_end|>") and "21" not in runs[0]
    assert runs[1] == "It is 21 degrees in Paris.<|im_end|>"
    for turn in (2, 4):  # each inference prompt, tools included, is a token prefix of the training sequence
        prompt = tiny_tokenizer(
            encoder.render(CHAT[:turn], add_generation_prompt=True, tools=TOOLS), add_special_tokens=False
        )["input_ids"]
        assert encoded.input_ids[: len(prompt)] == prompt and not encoded.supervised[len(prompt) - 1]
    # what the model learns to write parses back into the same call
    content, calls = parse_tool_calls(runs[0].removesuffix("<|im_end|>"))
    assert content is None and same_call(calls[0], CALL) == (True, True)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_parsing_reads_the_formats_models_write():
    for text in (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
    ):  # unclosed, string arguments
        content, calls = parse_tool_calls(text)
        assert content is None and len(calls) == 1 and same_call(calls[0], CALL) == (True, True), text
        assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_tool_calls("Just text, {no call}.") == ("Just text, {no call}.", [])
    content, calls = parse_tool_calls(
        'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    )
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["a", "b"]
