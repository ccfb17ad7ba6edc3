"""Tool-calling conversations and what published chat templates must train of them, for the tests of #33.

The template texts are in tests/data/templates/ (where each came from in the README there). For each one the
exact text it writes for the two calls below is spelled out by hand, so a training mask is checked against the
template's own output rather than against what the code under test computes.
"""

from __future__ import annotations

from pathlib import Path

from tests.masks import supervised_runs

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
MISTRAL = "mistralai-Mistral-Nemo-Instruct-2407.jinja"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct.jinja"
HERMES3 = "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"
QWEN25 = "Qwen-Qwen2.5-7B-Instruct.jinja"


def template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _function(name: str, argument: str, description: str) -> dict:
    properties = {argument: {"type": "string", "description": f"The {argument.replace('_', ' ')}."}}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": [argument]},
        },
    }


TOOLS = [
    _function("get_order", "order_id", "Look up an order by its number."),
    _function("track_parcel", "tracking", "Where a parcel is now."),
]
# Mistral's template refuses call ids that are not 9 characters long, so both are
ORDER_CALL = {
    "id": "a1b2c3d4e",
    "type": "function",
    "function": {"name": "get_order", "arguments": '{"order_id": "A17"}'},
}
TRACK_CALL = {
    "id": "f5g6h7i8j",
    "type": "function",
    "function": {"name": "track_parcel", "arguments": '{"tracking": "ZX9"}'},
}
SYSTEM = {"role": "system", "content": "You are the support bot of a small shop."}
ASK = {"role": "user", "content": "Where is my order A17?"}
CALL_ORDER = {"role": "assistant", "content": None, "tool_calls": [ORDER_CALL]}
CALL_TRACK = {"role": "assistant", "content": None, "tool_calls": [TRACK_CALL]}
ORDER = {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"status": "shipped", "tracking": "ZX9"}'}
PARCEL = {"role": "tool", "tool_call_id": "f5g6h7i8j", "content": '{"at": "Lyon depot"}'}
REPLY = {"role": "assistant", "content": "It has shipped and is at the Lyon depot."}
GREETING = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! How can I help?"}]
RECORDS = {
    # a support bot's record: a call, the tool's answer, then the reply
    "support": [SYSTEM, ASK, CALL_ORDER, ORDER, REPLY],
    # one call's answer leads to a second call before the reply
    "chained": [SYSTEM, ASK, CALL_ORDER, ORDER, CALL_TRACK, PARCEL, REPLY],
    # a greeting first, so a template that lists the tools before the last user turn (Mistral) moves them
    "greeted": [SYSTEM, *GREETING, ASK, CALL_ORDER, ORDER, REPLY],
}
TWO_CALLS = [SYSTEM, ASK, {**CALL_ORDER, "tool_calls": [ORDER_CALL, TRACK_CALL]}, ORDER, PARCEL, REPLY]

END_OF_TURN = {MISTRAL: "</s>", LLAMA31: "<|eot_id|>", HERMES3: "<|im_end|>", QWEN25: "<|im_end|>"}
_HERMES_CALLS = (
    '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "A17"}}\n</tool_call>',
    '<tool_call>\n{"name": "track_parcel", "arguments": {"tracking": "ZX9"}}\n</tool_call>',
)
CALL_TEXT = {  # template: how it writes ORDER_CALL's turn and TRACK_CALL's, without the end-of-turn token
    MISTRAL: (
        '[TOOL_CALLS][{"name": "get_order", "arguments": {"order_id": "A17"}, "id": "a1b2c3d4e"}]',
        '[TOOL_CALLS][{"name": "track_parcel", "arguments": {"tracking": "ZX9"}, "id": "f5g6h7i8j"}]',
    ),
    LLAMA31: (
        '{"name": "get_order", "parameters": {"order_id": "A17"}}',
        '{"name": "track_parcel", "parameters": {"tracking": "ZX9"}}',
    ),
    HERMES3: _HERMES_CALLS,
    QWEN25: _HERMES_CALLS,
}


def expected_runs(name: str, messages: list[dict]) -> list[str]:
    """What each trained assistant turn must teach under template `name`: the call exactly as the template writes
    it, or the reply's text, each followed by the end-of-turn token."""
    out = []
    for message in messages:
        if message["role"] != "assistant":
            continue
        if message.get("tool_calls"):
            text = CALL_TEXT[name][0 if message["tool_calls"][0] is ORDER_CALL else 1]
        else:
            text = message["content"]
        out.append(text + END_OF_TURN[name])
    return out


def learned_runs(encoder, messages: list[dict]) -> list[str]:
    """The decoded text of every supervised stretch of the example's training sequences, in order."""
    (sequences,) = encoder.encode_examples([messages], [TOOLS])
    assert not any(s.missing_eot for s in sequences)
    return [encoder.tokenizer.decode(run) for s in sequences for run in supervised_runs(s.input_ids, s.supervised)]


def check_inference_prompts(encoder, messages: list[dict]) -> None:
    """Each trained turn's sequence starts with exactly the tokens inference prompts with, and its answer starts
    right after them."""
    (sequences,) = encoder.encode_examples([messages], [TOOLS])
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for n, i in enumerate(turns):
        sequence = sequences[0] if len(sequences) == 1 else sequences[n]
        prompt = encoder.render(messages[:i], add_generation_prompt=True, tools=TOOLS)
        ids = encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert sequence.input_ids[: len(ids)] == ids, i
        assert not sequence.supervised[len(ids) - 1] and sequence.supervised[len(ids)], i
