"""Loss masks on four template families: exactly the assistant content plus its end-of-turn token."""

from __future__ import annotations

import pytest

from tests.masks import supervised_runs
from tuneforge.data.chat import ChatEncoder

from ..conftest import CHATML, make_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

STYLES = {
    "chatml": dict(
        template=CHATML, bos="<|im_start|>", eos="<|im_end|>", specials=(), eot="<|im_end|>", single_bos=False
    ),
    "llama3": dict(
        template=LLAMA3,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eot="<|eot_id|>",
        single_bos=True,
    ),
    "mistral": dict(
        template=MISTRAL,
        bos="<s>",
        eos="</s>",
        specials=("<s>", "</s>", "[INST]", "[/INST]"),
        eot="</s>",
        single_bos=True,
    ),
    "gemma": dict(
        template=GEMMA,
        bos="<bos>",
        eos="<eos>",
        specials=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        eot="<end_of_turn>",
        single_bos=True,
    ),
}

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "Four, of course."},
]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_supervised_positions_are_assistant_content_and_end_of_turn(style):
    spec = STYLES[style]
    tokenizer = make_tokenizer(spec["template"], spec["bos"], spec["eos"], spec["specials"])
    encoder = ChatEncoder(tokenizer)
    assert encoder.end_of_turn == spec["eot"]
    encoded = encoder.encode(CONVERSATION)
    runs = [tokenizer.decode(run) for run in supervised_runs(encoded.input_ids, encoded.supervised)]
    assert runs == [f"Paris.{spec['eot']}", f"Four, of course.{spec['eot']}"]
    assert not encoded.missing_eot
    if spec["single_bos"]:
        assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids(spec["bos"])) == 1  # no double BOS
    # the prompt the model gets at inference is a token prefix of the training sequence
    for turn in (1, 3):
        prompt = tokenizer.apply_chat_template(CONVERSATION[:turn], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
        assert not encoded.supervised[len(prompt_ids) - 1] and encoded.supervised[len(prompt_ids)]
        if turn == 1:
            assert not any(encoded.supervised[: len(prompt_ids)])
    labels = encoded.labels()
    assert [t for t, label in zip(encoded.input_ids, labels) if label != -100] == [
        t for t, k in zip(encoded.input_ids, encoded.supervised) if k
    ]


# Mistral-7B-Instruct's published template, in short: the system prompt goes into the last user turn only
MISTRAL_FOLDING = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}{% for m in turns %}"
    "{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
    "{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}] + CONVERSATION


def _prompt_ids(tokenizer, messages):
    return tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]


def test_a_template_that_folds_the_system_prompt_trains_one_sequence_per_turn():
    tokenizer = make_tokenizer(MISTRAL_FOLDING, "<s>", "</s>", ("<s>", "</s>", "[INST]", "[/INST]"))
    encoder = ChatEncoder(tokenizer)
    (sequences,) = encoder.encode_examples([WITH_SYSTEM])
    assert len(sequences) == 2
    for sequence, turn, answer in zip(sequences, (2, 4), ("Paris.", "Four, of course.")):
        prompt = _prompt_ids(tokenizer, WITH_SYSTEM[:turn])
        assert sequence.input_ids[: len(prompt)] == prompt  # starts exactly as inference will, system prompt included
        assert not any(sequence.supervised[: len(prompt)])
        (run,) = supervised_runs(sequence.input_ids, sequence.supervised)
        assert tokenizer.decode(run).strip() == f"{answer}</s>"
    assert "Be brief." in tokenizer.decode(sequences[0].input_ids)
    assert encoder.encode(WITH_SYSTEM).input_ids == sequences[-1].input_ids  # one sequence wanted: the last turn's


def test_weight_zero_answers_are_context_not_targets():
    tokenizer = make_tokenizer()
    encoder = ChatEncoder(tokenizer)
    weighted = [dict(m) for m in CONVERSATION]
    weighted[1]["weight"] = 0
    encoded = encoder.encode(weighted)
    runs = [tokenizer.decode(run) for run in supervised_runs(encoded.input_ids, encoded.supervised)]
    assert runs == ["Four, of course.<|im_end|>"]
    assert "Paris." in tokenizer.decode(encoded.input_ids)  # still seen, as context
    folding = ChatEncoder(make_tokenizer(MISTRAL_FOLDING, "<s>", "</s>", ("<s>", "</s>", "[INST]", "[/INST]")))
    (sequences,) = folding.encode_examples([[WITH_SYSTEM[0]] + weighted])
    assert len(sequences) == 1 and "Four" in folding.tokenizer.decode(sequences[0].input_ids)


def test_weights_other_than_zero_or_one_and_on_other_roles_are_named():
    from tuneforge.data.validate import check_record

    record = {
        "messages": [
            {"role": "user", "content": "hi", "weight": 1},
            {"role": "assistant", "content": "yo", "weight": 0.5},
        ]
    }
    problems = check_record(record, "train.jsonl:3")
    assert [(p.code, p.where) for p in problems] == [("invalid_weight", "train.jsonl:3")] * 2
    assert "message 1 (user)" in problems[0].message and "weight 0.5" in problems[1].message
    assert not check_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}, "x"
    )


def test_template_whose_answer_cannot_be_found_is_refused():
    shifting = (
        "{% for m in messages %}{{ m['role'] + (loop.length|string) + ': ' + m['content']|upper + '<|im_end|>' }}"
        "{% endfor %}"
    )
    encoder = ChatEncoder(make_tokenizer(shifting))
    with pytest.raises(Exception, match="does not write assistant message 2's content"):
        encoder.encode(CONVERSATION)
