"""The real builtin SmolLM2, offline: converted once, loaded in fp32 and in 4-bit, and it knows Paris."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import ModelSection
from tuneforge.models import load_model, load_tokenizer, plan_device

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(model, tokenizer) -> str:
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_builtin_answers_paris(smollm_location, quantization):
    section = ModelSection(ref="builtin:smollm2-135m-instruct", quantization=quantization, device="cpu")
    plan = plan_device(section)
    assert plan.dtype == "float32"
    tokenizer = load_tokenizer(section, smollm_location)
    model = load_model(section, plan, smollm_location)
    if quantization == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert "Paris" in _answer(model, tokenizer)


def test_conversion_is_cached_safetensors(smollm_location):
    from pathlib import Path

    from tuneforge.models import materialize, resolve

    folder = Path(smollm_location)
    assert (folder / ".complete").exists()
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    stamp = (folder / ".complete").stat().st_mtime_ns
    assert materialize(resolve("builtin:smollm2-135m-instruct")) == smollm_location
    assert (folder / ".complete").stat().st_mtime_ns == stamp  # not converted twice
