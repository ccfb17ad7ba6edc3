"""KTO (`train.method: kto`): rated answers read and checked by prepare, the settings refused together, the class
weights, the KL partners, the feedback export of every thumb, and training steps on a tiny Llama that move only the
adapter and raise desirable answers over undesirable ones."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.test_prepare import experiment, run_prepare, write_lines
from tuneforge.config import KTOSettings
from tuneforge.data.prepare import DataError, prepare
from tuneforge.data.prepared import load_prepared
from tuneforge.errors import ConfigError

SYSTEM = {"role": "system", "content": "Be brief."}


def rated(question="What is two plus two?", answer="Four.", good=True):
    return {
        "messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "label": good,
    }


def test_tuneforge_and_trl_rated_answers_become_the_same_prepared_lines(tmp_path, tiny_tokenizer):
    ours = write_lines(tmp_path / "o.jsonl", [rated(), rated("Capital of France?", "Lyon.", False)])
    trl = write_lines(
        tmp_path / "t.jsonl",
        [
            {
                "prompt": [SYSTEM, {"role": "user", "content": "What is two plus two?"}],
                "completion": "Four.",
                "label": True,
            },
            {
                "prompt": [SYSTEM, {"role": "user", "content": "Capital of France?"}],
                "completion": [{"role": "assistant", "content": "Lyon."}],
                "label": False,
            },
        ],
    )
    written = []
    for path in (ours, trl):
        (tmp_path / path.stem).mkdir()
        report, run = run_prepare(
            tmp_path / path.stem, tiny_tokenizer, f"  train: {path}\n  valid_split: 0", "train: {method: kto}"
        )
        assert report["labels"]["train"]["counts"] == {"desirable": 1, "undesirable": 1}
        written.append((run.sub("data") / "train.jsonl").read_text())
        examples = load_prepared(run.sub("data"), "train")
        assert sorted(e.desirable for e in examples) == [False, True]
    assert written[0] == written[1]
    assert {json.loads(line)["label"] for line in written[0].splitlines()} == {True, False}


def test_earlier_answers_of_the_prompt_are_context_only_the_last_is_rated(tmp_path, tiny_tokenizer):
    turns = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    path = write_lines(tmp_path / "c.jsonl", [{"messages": turns, "label": True}])
    _, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0", "train: {method: kto}")
    (example,) = load_prepared(run.sub("data"), "train")
    assert example.messages[1]["weight"] == 0 and "weight" not in example.messages[3]


def test_each_broken_rated_answer_is_named_by_line_and_code_and_nothing_is_written(tmp_path, tiny_tokenizer):
    ok = rated()
    lines = [
        ok,  # 1 fine
        {"messages": ok["messages"]},  # 2 no label
        {**ok, "label": "yes"},  # 3 not true / false
        {**ok, "messages": ok["messages"][:-1]},  # 4 ends with the user: no answer to rate
        {"prompt": "", "completion": "x", "label": True},  # 5 empty TRL prompt
        {"prompt": "hi", "completion": [{"role": "assistant", "content": "a"}] * 2, "label": True},  # 6 two answers
        {"question": "hi", "label": True},  # 7 neither shape
    ]
    path = write_lines(tmp_path / "k.jsonl", lines)
    exp, run = experiment(tmp_path, f"  train: {path}", "train: {method: kto}")
    with pytest.raises(DataError) as info:
        prepare(exp, run, tokenizer=tiny_tokenizer, progress=False)
    named = {}
    for row in str(info.value).splitlines():
        if "k.jsonl line" in row:
            named.setdefault(int(row.split("k.jsonl line ")[1].split(":")[0]), set()).add(
                row.split("[")[1].split("]")[0]
            )
    assert named == {
        2: {"kto_missing_label"},
        3: {"kto_label_not_bool"},
        4: {"example_missing_assistant_message"},
        5: {"kto_empty_prompt"},
        6: {"kto_completion_count"},
        7: {"kto_missing_input"},
    }
    assert not run.sub("data").exists()


def test_kto_settings_are_refused_together_naming_each_key(tmp_path):
    from tuneforge.config import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: x\nmodel: {ref: builtin:smollm2-135m-instruct, quantization: none}\n"
        "data: {train: a.jsonl, format: preference, label: sentiment}\n"
        "train: {method: kto, micro_batch_size: 1, full_finetune: true, kto: {desirable_weight: 0}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = str(info.value)
    assert "train.kto.desirable_weight" in text and "line 4" in text  # a field's own check names its line
    path.write_text(path.read_text().replace(", kto: {desirable_weight: 0}", ""), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = str(info.value)
    for words in (
        "data.format is preference; use kto",
        "remove data.label",
        "full_finetune: false",
        "micro_batch_size: 1",
    ):
        assert words in text, text
    with pytest.raises(ConfigError, match="data.format: kto holds answers labelled for train.method: kto, not sft"):
        load_experiment(path, ["train.method=sft", "train.full_finetune=false", "data.label=null", "data.format=kto"])
    fixed = ["data.label=null", "train.full_finetune=false", "train.micro_batch_size=auto"]
    assert load_experiment(path, ["data.format=auto", *fixed]).data.format == "auto"  # detected from the records


def test_rated_answers_are_detected_and_eval_never_takes_a_bad_answer_for_a_reference(tmp_path, tiny_tokenizer):
    from tuneforge.config import load_experiment
    from tuneforge.data.sources import detect_format
    from tuneforge.eval.harness import load_items

    assert detect_format(None, rated(), False, "data.train") == "kto"
    assert detect_format(None, {**rated(), "label": "positive"}, False, "data.train") == "messages"  # a class name
    path = write_lines(tmp_path / "k.jsonl", [rated(f"Q{i}?", f"Answer {i}.", i % 2 == 0) for i in range(8)])
    report, run = run_prepare(tmp_path, tiny_tokenizer, f"  train: {path}\n  valid_split: 0.5", "train: {method: kto}")
    assert report["counts"]["valid"] == 4 and report["labels"]["valid"]["counts"] == {"desirable": 2, "undesirable": 2}
    items = load_items(load_experiment(tmp_path / "exp.yaml"), run)
    assert sorted(int(item.reference.split()[1].rstrip(".")) % 2 for item in items) == [0, 0]


@pytest.mark.parametrize(
    "given, counts, weights",
    [
        ({}, (10, 30), (3.0, 1.0)),  # few desirable: they are weighted up
        ({}, (30, 7), (1.0, 4.285)),  # few undesirable: they are, rounded down so the ratio stays >= 1
        ({}, (6, 0), (1.0, 1.0)),  # one class only: nothing to balance
        ({}, (5, 5), (1.0, 1.0)),  # as many of each
        ({"undesirable_weight": 2.0}, (10, 30), (6.0, 2.0)),  # one set: the other balances it
    ],
)
def test_auto_weights_put_the_classes_in_the_kto_papers_range(given, counts, weights):
    from tuneforge.train.kto import BALANCED, class_weights

    chosen = class_weights(KTOSettings(**given), *counts)
    assert (chosen.desirable, chosen.undesirable) == weights
    if all(counts):
        assert BALANCED[0] <= chosen.desirable * counts[0] / (chosen.undesirable * counts[1]) <= BALANCED[1]


def test_weights_set_outside_the_range_are_warned_about_in_the_plan():
    from tuneforge.train.kto import class_weights

    assert "warning" in class_weights(KTOSettings(desirable_weight=1.0, undesirable_weight=1.0), 10, 30).describe()
    assert "warning" not in class_weights(KTOSettings(desirable_weight=3.5, undesirable_weight=1.0), 10, 30).describe()


def test_each_answer_is_paired_for_the_kl_term_with_another_of_its_micro_batch():
    from tuneforge.train.kto import shuffled, with_kl_answers

    rows = [{"prompt_ids": [i], "completion_ids": [100 + i], "label": i % 2 == 0} for i in range(5)]
    paired = with_kl_answers(rows, 2)
    assert [r["KL_completion_ids"] for r in paired] == [[101], [100], [103], [102], [104]]
    assert sorted(r["prompt_ids"][0] for r in shuffled(rows, 3)) == list(range(5))
    assert shuffled(rows, 3) == shuffled(rows, 3) != rows


def test_feedback_export_writes_one_kto_line_per_thumb_of_either_sign(tmp_path):
    from tuneforge.data.sources import read_json_records
    from tuneforge.data.unpaired import read_unpaired
    from tuneforge.feedback.export import export

    ask = [SYSTEM, {"role": "user", "content": "What does E3 mean?"}]
    answer = lambda system, text: {"system": system, "identity": system, "text": text, "sources": []}  # noqa: E731
    records = [
        {"kind": "thumb", "value": "up", "messages": ask, "answer": answer("finetuned", "Low battery.")},
        {"kind": "thumb", "value": "down", "messages": ask, "answer": answer("base", "Check the manual.")},
        {
            "kind": "thumb",
            "value": "down",
            "messages": [*ask[:1], {"role": "user", "content": "Hi"}],
            "answer": answer("base", "Error."),
        },  # a lone thumbs-down: DPO cannot use it, KTO can
        {"kind": "correction", "messages": ask, "answer": answer("base", "Hm."), "corrected": "Low battery."},
    ]
    result = export(records, tmp_path)
    assert result["kto"]["lines"] == 3 and result["kto"]["invalid"] == 0
    lines = [raw.data for raw in read_json_records(tmp_path / "kto.jsonl")]
    assert [(line["messages"][-1]["content"], line["label"]) for line in lines] == [
        ("Low battery.", True),
        ("Check the manual.", False),
        ("Error.", False),
    ]
    assert lines[0]["messages"][:-1] == ask  # the system prompt travels with the answer
    assert all(read_unpaired(line, "x")[0] is not None for line in lines)


def _logp(model, row) -> float:
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(row["completion_ids"])[:, None]).sum().item()


def _gap(model, rows) -> float:
    """Mean log-probability of the desirable answers minus that of the undesirable ones."""
    good = [_logp(model, r) for r in rows if r["label"]]
    bad = [_logp(model, r) for r in rows if not r["label"]]
    return sum(good) / len(good) - sum(bad) / len(bad)


class _Snapshot:
    """A trainer callback keeping every parameter's value at the start and the end of training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Snapshot(TrainerCallback):
            start: dict = {}
            end: dict = {}

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.start = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.end = {n: p.detach().clone() for n, p in model.named_parameters()}

        return Snapshot()


def test_kto_steps_move_only_the_adapter_and_raise_desirable_answers_over_undesirable(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_experiment
    from tuneforge.data.chat import ChatEncoder
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.kto import answer_rows, train_kto

    lines = [
        rated(f"What is two plus {i}?", "Four." if i % 3 else "Paris hello world.", bool(i % 3)) for i in range(24)
    ]
    write_lines(tmp_path / "k.jsonl", lines)
    (tmp_path / "kto.yaml").write_text(
        f"name: kto\nseed: 1\nmodel: {{ref: {tiny_model_dir}, quantization: none}}\n"
        "data: {train: k.jsonl, valid_split: 0.25, max_length: 64}\nlora: {r: 4, alpha: 8}\n"
        "train: {method: kto, max_steps: 8, lr: 5.0e-3, micro_batch_size: 4, grad_accum: 1, eval_every: 8, "
        "keep_best: false}\n",
        encoding="utf-8",
    )
    exp = load_experiment(tmp_path / "kto.yaml")
    run = RunDir(exp, tmp_path / "run").start("train")
    prepare(exp, run, load_tokenizer(exp.model), progress=False)
    snapshot = _Snapshot()
    summary = train_kto(exp, run, progress=False, callbacks=[snapshot])

    assert summary["method"] == "kto" and summary["steps"] == 8
    assert (summary["desirable_weight"], summary["undesirable_weight"]) == (1.0, 2.0)  # 12 desirable, 6 not
    changed = {n for n in snapshot.start if not torch.equal(snapshot.start[n], snapshot.end[n])}
    assert changed and all(".default." in n and "lora_" in n for n in changed), changed
    assert all(".ref." not in n for n in changed)  # the reference copy stays frozen

    records = [json.loads(line) for line in run.sub("metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # the KTO loss on the held-out answers falls
    assert evals[0]["eval_reward_margin"] == 0 < evals[1]["eval_reward_margin"]  # step 0: the policy is its reference
    assert any("kl" in r for r in records if "loss" in r) and run.sub("plots", "training.png").stat().st_size > 0

    rows, kept = answer_rows(ChatEncoder(load_tokenizer(exp.model)), load_prepared(run.sub("data"), "train"))
    rows = [{**row, "label": example.desirable} for row, example in zip(rows, kept)]  # as rated in the file
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = _gap(base, rows)
    after = _gap(PeftModel.from_pretrained(base, run.sub("adapter")).eval(), rows)
    assert after > before + 0.05, (before, after)
    assert not (run.sub("adapter") / "ref").exists()  # the frozen reference copy is not part of the result
