"""Tool calls end to end: an adapter trained on a tiny tool-call file (learned by heart) answers the official
`openai` client's `tools=[...]` request on `tuneforge serve` with a parsed call, plain and streamed."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.live import answers_models, free_port, running
from tests.wire import checked

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

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
SYSTEM = {"role": "system", "content": "You are a weather assistant."}


def _ask(city: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"What is the weather in {city}?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm_location):
    from tuneforge.config import load_experiment
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.local import train_local

    workdir = tmp_path_factory.mktemp("tools")
    lines = [
        {
            "tools": TOOLS,
            "messages": _ask(city)
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                        }
                    ],
                }
            ],
        }
        for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo"])
    ]
    (workdir / "tools.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (workdir / "tools.yaml").write_text(
        "name: tools\nseed: 1\nmodel: {ref: builtin:smollm2-135m-instruct, quantization: none}\n"
        "data: {train: tools.jsonl, valid_split: 0, max_length: 512}\nlora: {r: 16, alpha: 32, dropout: 0.0}\n"
        "train: {max_steps: 16, batch_size: 2, lr: 2.0e-3, packing: false, warmup_ratio: 0.0, schedule: constant}\n"
    )
    experiment = load_experiment(workdir / "tools.yaml")
    run = RunDir(experiment, workdir / "run").start("train")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    train_local(experiment, run, progress=False)
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    with running(
        ["serve", str(workdir / "tools.yaml"), "--port", str(port), "--run-dir", str(workdir / "run")],
        workdir,
        answers_models(client),
    ):
        client.workdir = workdir  # for the generate test, which uses the same trained run
        yield client


def test_a_trained_call_comes_back_parsed_and_schema_valid(server):
    raw = server.chat.completions.with_raw_response.create(
        model="finetuned", messages=_ask("Paris"), tools=TOOLS, max_tokens=48
    )
    reply = checked(ChatCompletion, json.loads(raw.text))  # strictly the official type, not the lenient parse
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # a city it never saw: the call generalises, arguments still a JSON string of an object
    other = server.chat.completions.create(
        model="finetuned", messages=_ask("Berlin"), tools=TOOLS, tool_choice="required", max_tokens=48
    )
    assert json.loads(other.choices[0].message.tool_calls[0].function.arguments) == {"city": "Berlin"}
    named = server.chat.completions.create(
        model="finetuned",
        messages=_ask("Rome"),
        max_tokens=48,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}


def test_streamed_tool_call_deltas(server):
    chunks = list(
        server.chat.completions.create(
            model="finetuned", messages=_ask("Oslo"), tools=TOOLS, max_tokens=48, stream=True
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text_and_bad_tools_are_named(server):
    reply = server.chat.completions.create(
        model="finetuned", messages=_ask("Paris"), tools=TOOLS, tool_choice="none", max_tokens=24
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(
            model="finetuned",
            messages=_ask("Paris"),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(
            model="finetuned", messages=_ask("Paris"), tools=[{"type": "function", "function": {"name": "a b"}}]
        )
    assert info.value.body["param"] == "tools"
    # the client sends the call and its result back: the follow-up is accepted
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    follow = _ask("Paris") + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": '{"temp_c": 21}'},
    ]
    reply = server.chat.completions.create(
        model="finetuned", messages=follow, tools=TOOLS, tool_choice="none", max_tokens=16
    )
    assert reply.choices[0].message.role == "assistant"


def test_generate_answers_a_prompts_file_with_tools(server):
    from tuneforge.cli import main

    workdir = server.workdir
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"messages": _ask("Lima"), "tools": TOOLS}) + "\n" + json.dumps({"messages": _ask("Lima")}) + "\n"
    )
    # the verb in this process (the model is loaded once more, the libraries are not)
    assert (
        main(
            [
                "generate",
                str(workdir / "tools.yaml"),
                "--run-dir",
                str(workdir / "run"),
                "--system",
                "finetuned",
                "--input",
                str(prompts),
                "--output",
                str(workdir / "answers.jsonl"),
                "--max-new-tokens",
                "48",
            ]
        )
        == 0
    )
    with_tools, without = [json.loads(x) for x in (workdir / "answers.jsonl").read_text().splitlines()]
    assert with_tools["finish_reason"] == "tool_calls" and json.loads(
        with_tools["tool_calls"][0]["function"]["arguments"]
    ) == {"city": "Lima"}
    assert "tool_calls" not in without  # no tools offered: a text answer
