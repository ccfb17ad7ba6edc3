"""Tool-calling records on published chat templates with real vocabularies (#33): the masks of
tests/unit/test_tool_templates.py where the tokenizer merges text as the model's does.

The vocabularies are tests/fetch_vocab.py's (missing files fail, as in test_real_tokenizers.py). Llama-3.1 and
Hermes-3 are built on Llama-3's vocabulary and Qwen2.5 on Qwen2's; Hermes-3's <|im_start|> and <|im_end|> stand on
reserved tokens that GGUF vocabulary does not name, so it is checked on Qwen2's, where they are special tokens.
Mistral's v3 vocabulary is the Llama-2 SentencePiece one with control tokens added ([INST], [TOOL_CALLS]...), which
is what is built here from the Llama-2 vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tool_chats import (
    HERMES3,
    LLAMA31,
    MISTRAL,
    QWEN25,
    RECORDS,
    check_inference_prompts,
    expected_runs,
    learned_runs,
    template,
)
from tuneforge.data.chat import ChatEncoder

pytestmark = pytest.mark.integration

VOCAB = Path(__file__).resolve().parents[1] / ".vocab"
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]"]
CASES = {  # template: (vocabulary folder, control tokens added as the model's vocabulary has them)
    MISTRAL: ("ggml-vocab-llama-spm", [*MISTRAL_CONTROL, "[/TOOL_RESULTS]"]),
    LLAMA31: ("ggml-vocab-llama-bpe", []),
    HERMES3: ("ggml-vocab-qwen2", []),
    QWEN25: ("ggml-vocab-qwen2", []),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def named_encoder(request):
    from transformers import AutoTokenizer

    folder, control = CASES[request.param]
    if not (VOCAB / folder).exists():
        pytest.fail(f"{VOCAB / folder} is missing: run `python tests/fetch_vocab.py` (the README's test command does)")
    tokenizer = AutoTokenizer.from_pretrained(str(VOCAB / folder))  # its own copy: the template and tokens change
    if control:
        tokenizer.add_special_tokens({"additional_special_tokens": control})
    tokenizer.chat_template = template(request.param)
    return request.param, ChatEncoder(tokenizer)


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_calls_and_replies_train_exactly_as_written_on_real_vocabularies(named_encoder, record):
    name, encoder = named_encoder
    messages = RECORDS[record]
    assert learned_runs(encoder, messages) == expected_runs(name, messages)
    check_inference_prompts(encoder, messages)
