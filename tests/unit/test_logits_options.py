"""logprobs, logit_bias and response_format on the transformers engine (issue 31 item 9), with the tiny random
Llama: the logprobs are the model's own, a bias moves the greedy answer, a schema holds the answer, and rows
without these options in the same batch answer as they do alone."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tuneforge.engine.batcher import Request
from tuneforge.engine.transformers import Engine, Settings

CHAT = [{"role": "user", "content": "Say hello world to the thermostat schedule"}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "colour"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


@pytest.fixture()
def engine(talking_llama, tiny_tokenizer):
    return Engine(talking_llama, tiny_tokenizer, "base")


def _greedy_ids(engine, prompt: list[int], count: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_logprobs_are_the_models_own_and_list_the_top_alternatives(engine):
    answer = engine.answer(CHAT, Settings(max_new_tokens=8, logprobs=3))
    prompt = engine.prompt_ids(CHAT)
    assert answer.logprobs is not None and len(answer.logprobs) == answer.completion_tokens == 8
    ids = _greedy_ids(engine, prompt, 8)
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    direct = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
    assert sum(e["logprob"] for e in answer.logprobs) == pytest.approx(direct, abs=1e-3)
    for entry, token in zip(answer.logprobs, ids):
        assert entry["token"] == engine.tokenizer.decode([token])
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy took the top one
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    plain = engine.answer(CHAT, Settings(max_new_tokens=8))
    assert plain.logprobs is None and plain.text == answer.text


def test_streamed_pieces_carry_the_logprobs_of_their_tokens(engine):
    pieces = list(engine.stream(CHAT, Settings(max_new_tokens=8, logprobs=0)))
    streamed = [entry for piece in pieces[:-1] for entry in piece.logprobs]
    assert streamed == pieces[-1].logprobs and all(e["top_logprobs"] == [] for e in streamed)


def test_a_negative_bias_moves_the_greedy_answer_and_a_positive_one_forces_a_token(engine):
    prompt = engine.prompt_ids(CHAT)
    first = _greedy_ids(engine, prompt, 1)[0]
    plain = engine.answer(CHAT, Settings(max_new_tokens=6))
    banned = engine.answer(CHAT, Settings(max_new_tokens=6, logit_bias={first: -100.0}, logprobs=0))
    assert banned.text != plain.text
    assert engine.tokenizer.decode([first]) not in [e["token"] for e in banned.logprobs]
    forced = engine.tokenizer.encode("hello", add_special_tokens=False)[0]
    assert forced not in _greedy_ids(engine, prompt, 5)
    answer = engine.answer(CHAT, Settings(max_new_tokens=5, logit_bias={forced: 100.0}, logprobs=0))
    assert [e["token"] for e in answer.logprobs] == [engine.tokenizer.decode([forced])] * 5


def _validated(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_a_json_schema_answer_parses_and_validates_in_a_mixed_batch(engine):
    """One batch: a row held to a schema, a json_object row, a biased row and a plain one; the plain one answers as
    it does alone."""
    prompt = engine.prompt_ids(CHAT)
    alone = engine.answer(CHAT, Settings(max_new_tokens=10))
    requests = [
        Request(engine, prompt, Settings(max_new_tokens=60, response_format=JSON_SCHEMA), streaming=False),
        Request(engine, prompt, Settings(max_new_tokens=10), streaming=False),
        Request(engine, prompt, Settings(max_new_tokens=60, response_format={"type": "json_object"}), False),
        Request(engine, prompt, Settings(max_new_tokens=10, logit_bias={5: 50.0}), streaming=False),
    ]
    schema_answer, plain, obj, _ = engine.batcher().run(requests)
    assert _validated(schema_answer.text) and schema_answer.finish_reason == "stop"
    assert plain.text == alone.text
    assert obj.text.startswith("{")  # a random model rambles inside the object; the builtin one closes it (e2e)


def test_a_schema_xgrammar_cannot_compile_is_a_value_error(engine):
    with pytest.raises(ValueError):
        engine.grammars().compile({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})


def test_the_server_answers_them_in_openais_shapes_and_refuses_bad_values(tmp_path, talking_llama, tiny_tokenizer):
    """Through serve's real app and the official openai client, which parses ChatCompletion and its chunks."""
    import openai
    from fastapi.testclient import TestClient

    from tuneforge.config import Experiment
    from tuneforge.run import RunDir
    from tuneforge.serve.server import Served, create_app

    folder = tmp_path / "talking"
    talking_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    experiment = Experiment.model_validate({"name": "server", "model": {"ref": str(folder)}})
    served = Served(experiment, RunDir(experiment, tmp_path / "server"), system_prompt="")
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", max_retries=0, http_client=TestClient(create_app(served))
    )
    ask = {"model": "base", "messages": CHAT, "max_tokens": 6}
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None
    answer = client.chat.completions.create(logprobs=True, top_logprobs=2, **ask)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert (
        "".join(t.token for t in content).strip()
        == answer.choices[0].message.content
        == plain.choices[0].message.content
    )
    chunks = list(client.chat.completions.create(logprobs=True, stream=True, **ask))
    streamed = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]

    schema = client.chat.completions.create(**{**ask, "max_tokens": 60}, response_format=JSON_SCHEMA)
    _validated(schema.choices[0].message.content)
    first = client.chat.completions.create(logprobs=True, **{**ask, "max_tokens": 1})
    token = tiny_tokenizer.encode(first.choices[0].logprobs.content[0].token, add_special_tokens=False)[0]
    banned = client.chat.completions.create(logit_bias={str(token): -100}, **{**ask, "max_tokens": 1})
    assert banned.choices[0].message.content != first.choices[0].message.content

    vocab = talking_llama.get_output_embeddings().weight.shape[0]
    for given, param in [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {str(vocab): 5}}, "logit_bias"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, **given)
        assert refused.value.param == param, (given, refused.value.message)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, logit_bias={str(vocab): 5})
    assert str(vocab) in refused.value.message
