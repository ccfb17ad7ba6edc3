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


def test_4bit_engine_answers_do_not_depend_on_the_batch(smollm_location):
    """The 4-bit engine on CPU scores a prompt the same alone and left-padded in a batch, so greedy answers agree."""
    from pathlib import Path

    from tuneforge.config import load_experiment
    from tuneforge.engine.transformers import Engine, Settings

    experiment = load_experiment(
        Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml", ["model.quantization=4bit"]
    )
    engine = Engine.load(experiment, "base")
    chats = [
        [{"role": "user", "content": q}]
        for q in (
            "What is the capital of France?",
            "My Kestrel K2 thermostat shows E3 after I replaced the batteries and rewired the C terminal. What now?",
            "Name three colours.",
            "Explain in detail, step by step, how a heat pump heats a house in winter.",
        )
    ]
    prompts = [engine.prompt_ids(c) for c in chats]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), engine.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        together = engine.model(input_ids=ids, attention_mask=mask).logits[:, -1]
        alone = torch.stack([engine.model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    assert (together - alone).abs().max() < 1e-3  # bitsandbytes' CPU inference kernel moved these by 0.34
    settings = Settings(max_new_tokens=12)
    assert [a.text for a in engine.generate(chats, settings, batch_size=4)] == [
        engine.generate([c], settings)[0].text for c in chats
    ]
