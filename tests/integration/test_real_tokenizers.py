"""Masks and inference prefixes on real tokenizers: Llama-2 SentencePiece, Llama-3, Qwen2 and Phi-3.

The vocabularies come from llama-cpp-python's source distribution (tests/fetch_vocab.py,
run by the README's test command). Missing files fail these tests: they are the point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.masks import supervised_runs
from tuneforge.data.chat import ChatEncoder

pytestmark = pytest.mark.integration

VOCAB = Path(__file__).resolve().parents[1] / ".vocab"

# The published formats, written out for the two vocabularies whose GGUF carries no template
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA31 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CASES = {  # name: (vocabulary file, template written here or None for the file's own)
    "llama-2": ("ggml-vocab-llama-spm.gguf", LLAMA2),
    "llama-3.1": ("ggml-vocab-llama-bpe.gguf", LLAMA31),
    "qwen2": ("ggml-vocab-qwen2.gguf", None),
    "phi-3": ("ggml-vocab-phi-3.gguf", None),
}
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


def _tokenizer(name):
    from transformers import AutoTokenizer

    gguf, template = CASES[name]
    if not (VOCAB / gguf).exists():
        pytest.fail(f"{VOCAB / gguf} is missing: run `python tests/fetch_vocab.py` (the README's test command does)")
    tokenizer = AutoTokenizer.from_pretrained(str(VOCAB), gguf_file=gguf)
    if template is not None:
        tokenizer.chat_template = template
    assert tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module", params=sorted(CASES))
def encoder(request):
    return ChatEncoder(_tokenizer(request.param))


def test_every_inference_prompt_is_a_token_prefix_of_the_training_sequence(encoder):
    encoded = encoder.encode(CHAT)
    tokenizer = encoder.tokenizer
    for turn in (2, 4):  # each assistant turn: what inference sends before it
        prompt = tokenizer(encoder.render(CHAT[:turn], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert encoded.input_ids[: len(prompt)] == prompt, tokenizer.convert_ids_to_tokens(encoded.input_ids[len(prompt) - 3 : len(prompt) + 3])
        assert not encoded.supervised[len(prompt) - 1]  # the prompt's last token is given, not learned
    assert encoded.input_ids == tokenizer(encoder.render(CHAT), add_special_tokens=False)["input_ids"]  # one tokenization, as inference


def test_the_mask_covers_exactly_each_answer_and_its_end_of_turn(encoder):
    encoded = encoder.encode(CHAT)
    tokenizer = encoder.tokenizer
    runs = supervised_runs(encoded.input_ids, encoded.supervised)
    assert len(runs) == 2
    for run, answer in zip(runs, ("Paris.", "Rome, of course.")):
        assert run[-1] == encoder.end_of_turn_id  # the model learns to stop
        assert tokenizer.decode(run[:-1]).strip() == answer
    assert not encoded.missing_eot
    bos = tokenizer.bos_token_id
    assert encoded.input_ids[:2].count(bos) <= 1 if bos is not None else True  # no BOS on top of the template's


def test_sentencepiece_answers_are_spelled_as_in_the_whole_text():
    # Phi-3's SentencePiece vocabulary: "Paris." on its own starts with "▁Paris"; inside the conversation the
    # whole text tokenizes it as "Par", "is". Training must see what inference sees.
    encoder = ChatEncoder(_tokenizer("phi-3"))
    tokenizer = encoder.tokenizer
    alone = tokenizer.convert_ids_to_tokens(tokenizer("Paris.", add_special_tokens=False)["input_ids"])
    encoded = encoder.encode(CHAT[:3])
    learned = tokenizer.convert_ids_to_tokens(supervised_runs(encoded.input_ids, encoded.supervised)[0])
    assert alone[0].startswith("▁") and not any(t.startswith("▁Par") for t in learned), (alone, learned)
