"""Masks and inference prefixes on real tokenizers: Llama-2 / Mistral SentencePiece, Llama-3, Qwen2, Phi-3 and Gemma.

The vocabularies come from llama-cpp-python's source distribution (tests/fetch_vocab.py,
run by the README's test command). Missing files fail these tests: they are the point.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.masks import supervised_runs
from tuneforge.data.chat import ChatEncoder
from tuneforge.models import chatml_template

pytestmark = pytest.mark.integration

VOCAB = Path(__file__).resolve().parents[1] / ".vocab"

# The published formats, written out for the two vocabularies whose GGUF carries no template
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA31 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral-7B-Instruct v0.3's: the system prompt joins the *last* user turn only, so a rendered training conversation
# (which ends with an answer) has no system prompt at all, while every inference prompt has it
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %}"
    "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)
# Gemma 2 / 3's layout, which has no system role (the system prompt opens the first user turn), with the turn
# markers of the Gemma vocabulary at hand (Gemma 4's)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim + '<turn|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)
CASES = {  # name: (vocabulary file, template written here or None for the file's own)
    "llama-2": ("ggml-vocab-llama-spm.gguf", LLAMA2),
    "mistral": ("ggml-vocab-llama-spm.gguf", MISTRAL),
    "llama-3.1": ("ggml-vocab-llama-bpe.gguf", LLAMA31),
    "qwen2": ("ggml-vocab-qwen2.gguf", None),
    "phi-3": ("ggml-vocab-phi-3.gguf", None),
    # a base model's vocabulary with the chatml that model.chat_template: chatml gives it
    "llama-2-base-chatml": ("ggml-vocab-llama-spm.gguf", "chatml"),
    "gemma": ("ggml-vocab-gemma-4.gguf", GEMMA),
    # its generation prompt opens an empty thought channel that a rendered answer does not have
    "gemma-4": ("ggml-vocab-gemma-4.gguf", None),
}
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


@functools.cache
def _tokenizer(name):
    from transformers import AutoTokenizer

    gguf, template = CASES[name]
    folder = VOCAB / Path(gguf).stem  # the GGUF's tokenizer, converted by tests/fetch_vocab.py
    if not (VOCAB / gguf).exists() or not folder.exists():
        pytest.fail(f"{folder} is missing: run `python tests/fetch_vocab.py` (the README's test command does)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if template == "chatml":
        tokenizer.chat_template = chatml_template(tokenizer, gguf)
    elif template is not None:
        tokenizer.chat_template = template
    assert tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module", params=sorted(CASES))
def encoder(request):
    return ChatEncoder(_tokenizer(request.param))


def _sequence_of_turn(sequences, turn):
    """The training sequence that teaches assistant message `turn` (0-based index into CHAT)."""
    return sequences[0] if len(sequences) == 1 else sequences[(2, 4).index(turn)]


def test_every_inference_prompt_is_a_token_prefix_of_a_training_sequence(encoder):
    (sequences,) = encoder.encode_examples([CHAT])
    tokenizer = encoder.tokenizer
    for turn in (2, 4):  # each assistant turn: what inference sends before it
        encoded = _sequence_of_turn(sequences, turn)
        prompt = tokenizer(encoder.render(CHAT[:turn], add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        assert encoded.input_ids[: len(prompt)] == prompt, tokenizer.convert_ids_to_tokens(
            encoded.input_ids[len(prompt) - 3 : len(prompt) + 3]
        )
        assert (
            not encoded.supervised[len(prompt) - 1] and encoded.supervised[len(prompt)]
        )  # the prompt is given, not learned
    texts = [text for text, _ in encoder.units(CHAT)]
    assert [s.input_ids for s in sequences] == [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
    ]  # one tokenization, as inference


def test_the_mask_covers_exactly_each_answer_and_its_end_of_turn(encoder):
    (sequences,) = encoder.encode_examples([CHAT])
    tokenizer = encoder.tokenizer
    runs = [run for s in sequences for run in supervised_runs(s.input_ids, s.supervised)]
    assert len(runs) == 2
    for run, answer in zip(runs, ("Paris.", "Rome, of course.")):
        assert run[-1] == encoder.end_of_turn_id  # the model learns to stop
        assert tokenizer.decode(run[:-1]).strip() == answer
    assert not any(s.missing_eot for s in sequences)
    bos = tokenizer.bos_token_id
    for s in sequences:
        assert s.input_ids[:2].count(bos) <= 1 if bos is not None else True  # no BOS on top of the template's


def test_templates_that_render_history_differently_train_one_sequence_per_turn():
    for name in ("mistral", "gemma-4"):
        encoder = ChatEncoder(_tokenizer(name))
        assert len(encoder.units(CHAT)) == 2, name
    for name in ("llama-2", "gemma"):
        assert len(ChatEncoder(_tokenizer(name)).units(CHAT)) == 1, name
    mistral = ChatEncoder(_tokenizer("mistral"))
    assert "Answer in one word." not in mistral.render(CHAT)  # the trap: the whole conversation loses the system prompt
    assert all("Answer in one word." in text for text, _ in mistral.units(CHAT))


def test_sentencepiece_answers_are_spelled_as_in_the_whole_text():
    # Phi-3's SentencePiece vocabulary: "Paris." on its own starts with "▁Paris"; inside the conversation the
    # whole text tokenizes it as "Par", "is". Training must see what inference sees.
    encoder = ChatEncoder(_tokenizer("phi-3"))
    tokenizer = encoder.tokenizer
    alone = tokenizer.convert_ids_to_tokens(tokenizer("Paris.", add_special_tokens=False)["input_ids"])
    encoded = encoder.encode(CHAT[:3])
    learned = tokenizer.convert_ids_to_tokens(supervised_runs(encoded.input_ids, encoded.supervised)[0])
    assert alone[0].startswith("▁") and not any(t.startswith("▁Par") for t in learned), (alone, learned)


# Qwen2.5's tools layout (its published template, written out here for the Qwen2 vocabulary, which is the same):
# tools listed in the system turn, calls as <tool_call> JSON with `tojson` arguments, tool answers in a user turn
QWEN25_TOOLS = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = 'You are a helpful assistant.' %}{% set turns = messages %}{% endif %}"
    "{{ '<|im_start|>system\\n' + system }}{% if tools %}{{ '\\n\\n# Tools\\n\\nYou may call functions.\\n<tools>' }}"
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools>' }}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% for m in turns %}{% if m['role'] == 'tool' %}"
    "{% if loop.first or turns[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or turns[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + (m['content'] or '') }}"
    "{% for c in m.get('tool_calls') or [] %}{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' "
    "+ (c['function']['arguments'] | tojson) + '}\\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]


def test_a_tools_template_gets_decoded_arguments_masks_and_prefixes():
    from transformers import AutoTokenizer

    from tuneforge.data.tools import parse_tool_calls, same_call

    tokenizer = AutoTokenizer.from_pretrained(
        str(VOCAB / Path(CASES["qwen2"][0]).stem)
    )  # its own copy: another template
    tokenizer.chat_template = QWEN25_TOOLS
    encoder = ChatEncoder(tokenizer)
    assert encoder.native_tools
    text = encoder.render(TOOL_CHAT, tools=TOOLS)
    assert '"arguments": {"city": "Paris"}' in text and '\\"city\\"' not in text  # decoded once, not encoded twice
    encoded = encoder.encode(TOOL_CHAT, TOOLS)
    runs = [tokenizer.decode(r) for r in supervised_runs(encoded.input_ids, encoded.supervised)]
    assert len(runs) == 2 and runs[0].strip().startswith("<tool_call>") and "<tool_response>" not in "".join(runs)
    assert runs[1] == "It is 21 degrees.<|im_end|>"
    for turn in (1, 3):
        prompt = tokenizer(
            encoder.render(TOOL_CHAT[:turn], add_generation_prompt=True, tools=TOOLS), add_special_tokens=False
        )["input_ids"]
        assert encoded.input_ids[: len(prompt)] == prompt
    content, calls = parse_tool_calls(runs[0].removesuffix("<|im_end|>"))
    assert content is None and same_call(calls[0], CALL) == (True, True)


def test_chatml_for_a_base_model_opens_with_its_bos_and_stops_at_its_eos():
    from transformers import AutoTokenizer

    encoder = ChatEncoder(_tokenizer("llama-2-base-chatml"))
    tokenizer = encoder.tokenizer
    assert encoder.end_of_turn == tokenizer.eos_token == "</s>" and encoder.stop_ids == [tokenizer.eos_token_id]
    (sequences,) = encoder.encode_examples([CHAT])
    assert all(s.input_ids[0] == tokenizer.bos_token_id for s in sequences)  # as the base read all its pretraining text
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(str(VOCAB / "ggml-vocab-llama-spm")))  # nothing added
