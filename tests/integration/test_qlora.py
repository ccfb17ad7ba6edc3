"""QLoRA on the real builtin SmolLM2 (4-bit NF4 on CPU): gradients flow, the loss falls, the adapter round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tuneforge.config import ModelSection, load_experiment
from tuneforge.models import keep_4bit_layers_differentiable, load_model, load_tokenizer, plan_device

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _first_layer_grad(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    name, param = next(
        (n, p) for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n
    )  # A gets no grad while B is zero
    return param.grad.detach().clone()


def test_gradients_still_flow_after_an_evaluation(smollm_location):
    """An eval pass must not switch the 4-bit layers to bitsandbytes' inference-only CPU kernel."""
    from tuneforge.train.local import add_adapters

    experiment = load_experiment(REPO / "configs" / "quickstart.yaml", ["lora.dropout=0"])
    section = ModelSection(quantization="4bit", device="cpu")
    plan = plan_device(section)
    torch.manual_seed(0)
    model = add_adapters(load_model(section, plan, smollm_location), experiment, plan)
    ids = torch.randint(0, 40000, (1, 24))
    fresh = _first_layer_grad(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after_eval = _first_layer_grad(model, ids)
    assert fresh.abs().sum() > 0
    assert torch.allclose(fresh, after_eval, rtol=1e-4, atol=1e-7)


def test_short_qlora_run_learns_and_adapter_round_trips(tmp_path, smollm_location):
    from peft import PeftModel

    from tuneforge.data.prepare import prepare
    from tuneforge.data.prepared import load_prepared
    from tuneforge.run import RunDir
    from tuneforge.train.local import train_local

    experiment = load_experiment(
        REPO / "configs" / "quickstart.yaml",
        [
            "train.max_steps=6",
            "train.lr=1e-3",
            "train.eval_every=6",
            "data.sample=48",
            "data.rag=false",
            "model.quantization=4bit",
        ],
    )
    run = RunDir(experiment, tmp_path / "run").start("train")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    summary = train_local(experiment, run, progress=False)
    assert summary["steps"] == 6
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    losses = [json.loads(x).get("loss") for x in run.sub("metrics.jsonl").read_text().splitlines()]
    assert all(loss is None or math.isfinite(loss) for loss in losses)

    # the saved adapter on a freshly loaded 4-bit base reproduces the trained model's logits
    section = ModelSection(quantization="4bit", device="cpu")
    tokenizer = load_tokenizer(section, smollm_location)
    example = load_prepared(run.sub("data"), "valid")[0]
    ids = torch.tensor([tokenizer.apply_chat_template(example.messages, tokenize=True)["input_ids"]])

    def fresh_base():
        model = load_model(section, plan_device(section), smollm_location)
        keep_4bit_layers_differentiable(model)  # the training path's numerics, not the inference kernel's
        return model

    base = fresh_base()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, run.sub("adapter")).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    again = PeftModel.from_pretrained(fresh_base(), run.sub("adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, tuned_logits, atol=1e-4)

    # merged into a full-precision base: the same greedy answers as the adapter on that base
    from tuneforge.merge import merge

    report = merge(experiment, run, max_new_tokens=24)
    assert report["probes"] == 8 and report["mismatches"] == []
    merged = run.sub("merged")
    assert list(merged.glob("*.safetensors")) and (merged / "chat_template.jinja").exists()
    assert not any(
        "lora" in k
        for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(next(merged.glob("*.safetensors")))
    )
