"""DPO on the real builtin SmolLM2: the preferred-over-rejected margin rises on the training pairs, the metrics
and plot show it, and a run started from an adapter uses that adapter as its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_experiment

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "data" / "support" / "preferences.jsonl"


def _experiment(tmp_path, name, *overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nseed: 3\nmodel: {{ref: builtin:smollm2-135m-instruct, quantization: none}}\n"
        f"data: {{train: {PAIRS}, valid_split: 0, sample: 4, max_length: 192}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {method: dpo, batch_size: 2, lr: 1.0e-3, warmup_ratio: 0.0, schedule: constant, keep_best: false}\n",
        encoding="utf-8",
    )
    return load_experiment(path, list(overrides))


def _margins(model, encoder, examples) -> list[float]:
    """Per pair: log p(preferred) - log p(non-preferred), summed over each answer's tokens."""
    from tuneforge.train.dpo import pair_rows

    rows, _ = pair_rows(encoder, examples, 192)
    out = []
    with torch.no_grad():
        for row in rows:
            scores = []
            for answer in (row["chosen_ids"], row["rejected_ids"]):
                ids = torch.tensor([row["prompt_ids"] + answer])
                logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1 : -1].float()
                scores.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum().item())
            out.append(scores[0] - scores[1])
    return out


def test_dpo_raises_the_margin_and_a_started_run_is_referenced_to_its_start(tmp_path, smollm_location):
    from peft import PeftModel

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepare import prepare
    from tuneforge.data.prepared import load_prepared
    from tuneforge.models import load_model, load_tokenizer, plan_device
    from tuneforge.run import RunDir
    from tuneforge.train.dpo import train_dpo

    experiment = _experiment(tmp_path, "dpo", "train.max_steps=6")
    run = RunDir(experiment, tmp_path / "run").start("train")
    tokenizer = load_tokenizer(experiment.model)
    prepare(experiment, run, tokenizer, progress=False)
    summary = train_dpo(experiment, run, progress=False)
    assert summary["method"] == "dpo" and summary["steps"] == 6

    records = [json.loads(x) for x in run.sub("metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert len(margins) == 6 and all("preference_accuracy" in r for r in records if "reward_margin" in r)
    assert abs(margins[0]) < 1e-4  # step 1 is measured before any update: the policy is its reference
    assert run.sub("plots", "training.png").stat().st_size > 0

    encoder = ChatEncoder(tokenizer)
    pairs = load_prepared(run.sub("data"), "train")
    base = load_model(experiment.model, plan_device(experiment.model), smollm_location).eval()
    before = _margins(base, encoder, pairs)
    tuned = PeftModel.from_pretrained(base, run.sub("adapter")).eval()
    after = _margins(tuned, encoder, pairs)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before, after)
    assert sum(a > b for a, b in zip(after, before)) >= len(pairs) - 1
    assert not (run.sub("adapter") / "ref").exists()  # the frozen reference copy is not part of the result

    # started from that adapter: the reference is the adapter, so the first measured margin is 0 again (against
    # the bare base it would be the trained one, several units)
    second = _experiment(tmp_path, "dpo2", "train.max_steps=1", f"train.init_adapter={run.path}")
    run2 = RunDir(second, tmp_path / "run2").start("train")
    prepare(second, run2, tokenizer, progress=False)
    summary2 = train_dpo(second, run2, progress=False)
    assert summary2["init_adapter"] == str(run.sub("adapter"))
    first = [json.loads(x) for x in run2.sub("metrics.jsonl").read_text().splitlines()][0]
    assert abs(first["reward_margin"]) < 1e-4, first
    continued = PeftModel.from_pretrained(
        load_model(experiment.model, plan_device(experiment.model), smollm_location).eval(), run2.sub("adapter")
    ).eval()
    again = _margins(continued, encoder, pairs)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(again) > (mean(before) + mean(after)) / 2, (before, after, again)  # it went on from the trained adapter
