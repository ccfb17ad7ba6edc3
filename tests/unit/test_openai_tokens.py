"""Hosted token counts: OpenAI's own encoding per model, found offline, a bad copy refused, a clear fallback."""

from __future__ import annotations

import gzip

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from tuneforge.data import openai_tokens
from tuneforge.data.records import Example
from tuneforge.data.report import openai_estimate

CONVERSATION = [
    {"role": "system", "content": "Réponds brièvement."},
    {"role": "user", "content": "Quelle est la capitale du Japon ?"},
    {"role": "assistant", "content": "Tokyo."},
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty tiktoken cache, no network: only a local copy can give tiktoken its files."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))

    def no_network(blobpath):
        raise ConnectionError(f"offline: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings another test loaded in this process
    return tmp_path


@pytest.mark.parametrize(
    "model, name",
    [
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-2025-04-14", "o200k_base"),
        ("ft:gpt-4o-2024-08-06:acme::abc123", "o200k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("a-model-tiktoken-does-not-know", "o200k_base"),
    ],
)
def test_each_hosted_model_is_counted_with_its_own_encoding(model, name):
    assert openai_tokens.encoding_name(model) == name


def test_offline_the_encoding_comes_from_the_bundled_copy_and_is_exact(offline):
    encoding, why = openai_tokens.encoding_for("gpt-4o-mini-2024-07-18")
    assert why is None and encoding.name == "o200k_base"
    assert encoding.decode(encoding.encode(CONVERSATION[1]["content"])) == CONVERSATION[1]["content"]
    # the documented framing: 3 tokens a message around its role and content, 3 to prime the reply
    expected = sum(3 + len(encoding.encode(m["role"])) + len(encoding.encode(m["content"])) for m in CONVERSATION) + 3
    assert openai_tokens.example_tokens(encoding, CONVERSATION) == expected
    named = [*CONVERSATION[:2], {"role": "assistant", "name": "bot", "content": "Tokyo."}]
    assert openai_tokens.example_tokens(encoding, named) == expected + 1 + len(encoding.encode("bot"))


def test_a_corrupt_local_copy_is_refused_and_the_estimate_says_how_it_counted(offline, tiny_tokenizer):
    folder = offline / "home" / "tiktoken"
    folder.mkdir(parents=True)
    (folder / "o200k_base.tiktoken.gz").write_bytes(gzip.compress(b"dGVzdA== 0\n"))  # a valid format, the wrong ranks
    encoding, why = openai_tokens.encoding_for("gpt-4o-mini-2024-07-18")
    assert encoding is None and "o200k_base" in why

    from tuneforge.config import Experiment

    experiment = Experiment.model_validate({"name": "hosted", "train": {"backend": "openai", "epochs": 2}})
    example = Example(CONVERSATION, "1", "x.jsonl line 1", n_tokens=41)
    estimate = openai_estimate([example], experiment)
    assert estimate["tokenizer"] == "local" and estimate["billed_tokens"] == 82
    assert "experiment model's tokenizer" in estimate["note"] and "o200k_base" in estimate["note"]


def test_tools_tool_calls_and_preference_pairs_are_counted(offline):
    encoding, _ = openai_tokens.encoding_for("gpt-4o-mini-2024-07-18")
    call = {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    ]
    plain = openai_tokens.example_tokens(encoding, CONVERSATION[:2] + [call])
    assert plain > openai_tokens.example_tokens(encoding, CONVERSATION[:2] + [{"role": "assistant", "content": ""}])
    assert openai_tokens.example_tokens(encoding, CONVERSATION[:2] + [call], tools) > plain
    rejected = {"role": "assistant", "content": "Kyoto, I believe."}
    assert openai_tokens.example_tokens(encoding, CONVERSATION, rejected=rejected) == openai_tokens.example_tokens(
        encoding, CONVERSATION
    ) + openai_tokens.message_tokens(encoding, rejected)
