"""Shared fixtures: a tiny random Llama and an in-memory ChatML tokenizer (unit tests),
and the real builtin SmolLM2 (integration tests), loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA GPU; elsewhere they are reported as skipped, with why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    """No hub access, and converted models cached in a per-session folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TUNEFORGE_HOME", str(tmp_path_factory.mktemp("tuneforge-home")))
    yield


def make_tokenizer(
    template: str = CHATML, bos: str = "<|im_start|>", eos: str = "<|im_end|>", specials: tuple[str, ...] = ()
):
    """A byte-level BPE tokenizer trained in memory, with ChatML (or the given) special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The capital of France is Paris.",
        "Classify the sentiment of a review. positive negative",
        "You are a helpful assistant. What is two plus two? Four.",
        "system user assistant hello world thermostat schedule",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token="<|endoftext|>",
        chat_template=template,
        additional_special_tokens=list(specials),
    )


def make_llama(vocab_size: int, seed: int = 0, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return make_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def talking_llama(tiny_tokenizer):
    """A tiny random Llama with untied embeddings: its greedy answers are varied text, where the tied one
    repeats its prompt's last token (a newline), which would make any comparison of answers vacuous."""
    return make_llama(len(tiny_tokenizer), tie=False)


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    """The tiny model saved as an ordinary local model directory."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm_location():
    """The builtin SmolLM2 converted to safetensors (once per session)."""
    from tuneforge.models import materialize, resolve

    return materialize(resolve("builtin:smollm2-135m-instruct"))
