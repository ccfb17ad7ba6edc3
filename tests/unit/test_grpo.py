"""train.method: grpo: prompts and items from prepared data, a grader as the reward, and a policy that moves toward
what the grader rewards."""

from __future__ import annotations

import json

import pytest

from tuneforge.config import load_experiment
from tuneforge.errors import TuneforgeError

LETTER = "e"  # the reward: does the one-token completion contain it (a share of the tiny vocabulary, not all of it)


def _experiment(tmp_path, model_dir, rows, *overrides):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "grpo.yaml"
    path.write_text(
        f"name: grpo\nseed: 5\nmodel: {{ref: {model_dir}, quantization: none, chat_template: chatml}}\n"
        f"data: {{train: {data}, valid_split: 0, max_length: 64}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {method: grpo, lr: 5.0e-2, warmup_ratio: 0.0, schedule: constant, keep_best: false,\n"
        "        grpo: {generations: 8, max_completion_tokens: 1, beta: 0.01,\n"
        f"               grader: {{type: string_check, name: letter, input: '{{{{sample.output_text}}}}',\n"
        f"                         reference: '{LETTER}', operation: like}}}}}}\n",
        encoding="utf-8",
    )
    return load_experiment(path, list(overrides))


def _chat(i):
    return {"messages": [{"role": "user", "content": f"word {i}"}, {"role": "assistant", "content": "x"}]}


def test_a_grpo_run_logs_rewards_spread_and_kl_and_trains_the_adapter(tmp_path, tiny_model_dir):
    """The recipe end to end on a tiny model: metrics, plot, adapter (tests/integration/test_grpo.py: learning)."""
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.grpo import train_grpo

    experiment = _experiment(tmp_path, tiny_model_dir, [_chat(i) for i in range(6)], "train.max_steps=6")
    run = RunDir(experiment, tmp_path / "run").start("train")
    tokenizer = load_tokenizer(experiment.model)
    prepare(experiment, run, tokenizer, progress=False)
    summary = train_grpo(experiment, run, progress=False)
    assert summary["method"] == "grpo" and summary["steps"] == 6 and summary["grader_errors"] == 0

    records = [json.loads(x) for x in run.sub("metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "reward" in r]
    assert len(trained) == 6
    assert all(
        {"reward_std", "groups_without_signal", "kl", "completion_length", "reward_letter"} <= set(r) for r in trained
    )
    assert all(r["completion_length"] <= 1 for r in trained)
    assert run.sub("plots", "training.png").stat().st_size > 0

    from safetensors.torch import load_file

    adapter = load_file(run.sub("adapter", "adapter_model.safetensors"))
    assert adapter and all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # every adapter moved
    assert summary["graded"] == 6 * 6 * 8 and summary["first_reward"] is not None


def test_prompts_keep_every_field_of_the_record_for_the_grader(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tuneforge.data.records import Example
    from tuneforge.train.grpo import prompt_rows

    example = Example(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        + [{"role": "assistant", "content": "Hello"}],
        id="a",
        where="f.jsonl line 1",
        label="greeting",
        extra={"reference_answer": "Hello there"},
    )
    (row,) = prompt_rows([example], tiny_tokenizer)
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert json.loads(row["item"]) == {"reference_answer": "Hello there", "label": "greeting", "answer": "Hello"}
    assert row["prompt_tokens"] > 0
    lone = Example(messages=[{"role": "assistant", "content": "x"}], id="b", where="f.jsonl line 2")
    with pytest.raises(TuneforgeError, match="f.jsonl line 2: train.method: grpo needs a prompt"):
        prompt_rows([lone], tiny_tokenizer)


def test_prepare_reads_openais_reinforcement_lines_and_keeps_every_field_for_the_grader(tmp_path, tiny_model_dir):
    """OpenAI's RFT format: a conversation ending with the user's turn (developer read as system) and any other keys;
    a prompt is kept whole, never trained on, and its fields reach the grader as `item` after the prepared round trip.
    """
    from tuneforge.data.prepare import prepare
    from tuneforge.data.prepared import load_prepared
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.grpo import prompt_rows

    def line(i, **fields):
        turns = [{"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": f"word {i}"}]
        return {"messages": turns, **fields}

    rows = [line(i, reference_answer=f"r{i}", label=i % 2, tags=["a", i]) for i in range(5)]
    rows.append(_chat(9) | {"reference_answer": "x"})  # a supervised line is read too: its answer is item.answer
    experiment = _experiment(tmp_path, tiny_model_dir, rows)
    run = RunDir(experiment, tmp_path / "run").start("prepare")
    tokenizer = load_tokenizer(experiment.model)
    report = prepare(experiment, run, tokenizer, progress=False)
    # prepare's plan is the one GRPO trains with (prompts a step), not SFT's
    assert report["local"]["reasons"]["batch_size"].startswith("6 prompts a step") and report["local"]["steps"] == 1
    examples = load_prepared(run.sub("data"), "train")
    assert len(examples) == 6
    items = {json.loads(r["item"])["reference_answer"]: r for r in prompt_rows(examples, tokenizer)}
    assert json.loads(items["r3"]["item"]) == {"reference_answer": "r3", "label": 1, "tags": ["a", 3], "answer": None}
    assert [m["role"] for m in items["r3"]["prompt"]] == ["system", "user"]
    assert json.loads(items["x"]["item"])["answer"] == "x"
    assert items["r3"]["prompt_tokens"] > 0


def test_a_reinforcement_line_must_end_with_the_users_turn_and_prompts_are_not_cut(tmp_path, tiny_model_dir):
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
    ends_with_tool = {"messages": [*turns, {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    long = {"messages": [{"role": "user", "content": "word " * 200}]}
    rows = [_chat(0), ends_with_tool, long]
    experiment = _experiment(tmp_path, tiny_model_dir, rows, "data.on_invalid=drop", "data.overflow=truncate")
    run = RunDir(experiment, tmp_path / "run").start("prepare")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    rejected = [json.loads(x) for x in run.sub("data", "rejected.jsonl").read_text().splitlines()]
    assert sorted(p["code"] for r in rejected for p in r["problems"]) == ["prompt_must_end_with_user", "too_long"]
    assert "a prompt to sample from is not cut" in rejected[-1]["problems"][0]["message"]


def test_a_grader_is_needed_unless_every_example_has_a_label(tmp_path, tiny_model_dir):
    from tuneforge.train.grpo import grader_for

    experiment = _experiment(tmp_path, tiny_model_dir, [_chat(0)], "train.grpo.grader=null")
    with pytest.raises(TuneforgeError, match="train.grpo.grader: none is set"):
        grader_for(experiment, [{"item": json.dumps({"label": None})}])
    grader, why = grader_for(experiment, [{"item": json.dumps({"label": "positive"})}])
    assert grader["reference"] == "{{item.label}}" and "data.label" in why
    bad = _experiment(tmp_path, tiny_model_dir, [_chat(0)], "train.grpo.grader={type: string_check}")
    with pytest.raises(TuneforgeError, match="train.grpo.grader"):
        grader_for(bad, [])


def test_a_grader_that_fails_on_a_sample_scores_it_zero_and_is_counted():
    from tuneforge.train.grpo import GraderReward

    reward = GraderReward(
        {"type": "string_check", "name": "x", "input": "{{item.missing}}", "reference": "a", "operation": "eq"}
    )
    scores = reward(["p", "p"], [[{"content": "a"}], [{"content": "b"}]], [json.dumps({}), json.dumps({})])
    assert scores == [0.0, 0.0] and reward.errors == 2 and reward.__name__ == "x"


def test_the_plan_groups_completions_by_prompt(tmp_path, tiny_model_dir):
    from tuneforge.train.grpo import grpo_plan

    experiment = _experiment(tmp_path, tiny_model_dir, [_chat(0)])
    plan = grpo_plan(experiment, 20, has_valid=True)
    assert plan.micro_batch_size == 8 and plan.grad_accum == 8 and plan.steps == 3  # 20 prompts, 8 a step, 1 epoch
    assert plan.lr == pytest.approx(5e-2) and plan.reasons["lr"] == "set in the experiment file"


def test_each_method_has_its_recipe():
    from tuneforge.train import recipe

    names = {m: recipe(m).__name__ for m in ("sft", "dpo", "kto", "grpo")}
    assert names == {"sft": "train_local", "dpo": "train_dpo", "kto": "train_kto", "grpo": "train_grpo"}
