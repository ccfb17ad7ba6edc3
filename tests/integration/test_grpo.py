"""GRPO on the real builtin SmolLM2: a string_check grader's reward rises, and the trained policy gives the rewarded
answer more often than the base (the expected reward, read exactly from the first token's probabilities)."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.config import load_experiment

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Is fire cold? Answer yes or no.",
    "Can fish fly? Answer yes or no.",
    "Is ice hot? Reply with yes or no only.",
]
HELD_OUT = "Do rocks swim? Yes or no?"


def _rewarded_share(model, tokenizer, question: str) -> float:
    """The probability that the one-token answer contains "no" (No, Not, None...): the grader's expected reward."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    hits = [i for i in range(len(probs)) if "no" in tokenizer.decode([i]).strip().lower()]
    return float(probs[hits].sum())


def test_grpo_raises_the_graders_reward_on_the_builtin(tmp_path, smollm_location):
    from peft import PeftModel

    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_model, load_tokenizer, plan_device
    from tuneforge.run import RunDir
    from tuneforge.train.grpo import train_grpo

    data = tmp_path / "questions.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "No"}]} for q in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "grpo.yaml"
    path.write_text(
        "name: grpo\nseed: 7\nmodel: {ref: builtin:smollm2-135m-instruct, quantization: none}\n"
        f"data: {{train: {data}, valid_split: 0, max_length: 64}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {method: grpo, max_steps: 3, lr: 2.0e-3, warmup_ratio: 0.0, schedule: constant, keep_best: false,\n"
        "        grpo: {generations: 6, max_completion_tokens: 1, beta: 0.01,\n"
        "               grader: {type: string_check, name: says_no, input: '{{sample.output_text}}',\n"
        "                        reference: 'no', operation: ilike}}}\n",
        encoding="utf-8",
    )
    experiment = load_experiment(path)
    run = RunDir(experiment, tmp_path / "run").start("train")
    tokenizer = load_tokenizer(experiment.model)
    prepare(experiment, run, tokenizer, progress=False)
    summary = train_grpo(experiment, run, progress=False)
    assert summary["steps"] == 3 and summary["grader_errors"] == 0 and summary["graded"] == 3 * 3 * 6

    records = [json.loads(x) for x in run.sub("metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_says_no"] for r in records if "reward_says_no" in r]
    assert len(rewards) == 3 and all(0 <= r <= 1 for r in rewards)  # sampled: noisy; the exact check is below

    base = load_model(experiment.model, plan_device(experiment.model), smollm_location).eval()
    before = [_rewarded_share(base, tokenizer, q) for q in [*QUESTIONS, HELD_OUT]]
    tuned = PeftModel.from_pretrained(base, run.sub("adapter")).eval()
    after = [_rewarded_share(tuned, tokenizer, q) for q in [*QUESTIONS, HELD_OUT]]
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)  # the held-out question too
