"""The experiment file: every problem named at once, overrides, explain and schema."""

from __future__ import annotations

import json

import pytest

from tuneforge.config import Experiment, LocalTrain, OpenAITrain, load_experiment, parse_override
from tuneforge.errors import ConfigError

GOOD = """\
name: demo
model: builtin:smollm2-135m-instruct
train:
  epochs: 1
  lr: 1e-4
"""


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    return info.value.problems


def test_good_file_loads_with_typed_defaults(tmp_path):
    exp = load_experiment(_write(tmp_path, GOOD))
    assert exp.model.ref == "builtin:smollm2-135m-instruct"  # string shorthand for model.ref
    assert isinstance(exp.train, LocalTrain)  # backend defaults to local
    assert exp.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as text; the schema makes it a float
    assert exp.train.max_grad_norm == 1.0 and exp.train.warmup_ratio > 0
    assert exp.rag is None


def test_misspelt_key_wrong_type_and_bad_choice_are_all_named(tmp_path):
    path = _write(
        tmp_path,
        """\
name: demo
model:
  quantisation: 4bit
train:
  epochs: three
  schedule: cosin
""",
    )
    problems = _problems(path)
    assert len(problems) == 3
    by_key = {p.split(": ", 2)[1]: p for p in problems}
    assert set(by_key) == {"model.quantisation", "train.epochs", "train.schedule"}
    assert "line 3" in by_key["model.quantisation"] and "did you mean 'quantization'" in by_key["model.quantisation"]
    assert "line 5" in by_key["train.epochs"] and "'three'" in by_key["train.epochs"]
    assert "'cosin'" in by_key["train.schedule"] and "did you mean 'cosine'" in by_key["train.schedule"]
    assert "'constant'" in by_key["train.schedule"]  # what is allowed


def test_unknown_top_level_section_gets_did_you_mean(tmp_path):
    (problem,) = _problems(_write(tmp_path, "name: x\ntrian: {epochs: 1}\n"))
    assert problem.startswith("line 2: trian: unknown key") and "did you mean 'train'" in problem


def test_backend_variant_keys_are_checked_per_backend(tmp_path):
    exp = load_experiment(_write(tmp_path, "name: x\ntrain: {backend: openai, epochs: 5, suffix: reviews}\n"))
    assert isinstance(exp.train, OpenAITrain) and exp.train.epochs == 5
    (problem,) = _problems(_write(tmp_path, "name: x\ntrain: {backend: openai, micro_batch_size: 8}\n"))
    assert problem.split(": ")[1] == "train.micro_batch_size" and "unknown key" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\ntrain: {backend: azure}\n"))
    assert problem == "line 2: train.backend: got 'azure'; allowed: local, openai"
    (problem,) = _problems(_write(tmp_path, "name: x\ntrain:\n  epochs: 2\n  backend: localhost\n"))
    assert problem == "line 4: train.backend: got 'localhost'; allowed: local, openai; did you mean 'local'?"
    (problem,) = _problems(_write(tmp_path, GOOD), ["train.backend=opnai"])
    assert problem.startswith("override train.backend: got 'opnai'") and "did you mean 'openai'" in problem


def test_missing_name_and_bad_name(tmp_path):
    (problem,) = _problems(_write(tmp_path, "seed: 1\n"))
    assert problem == "name: required key is missing"
    (problem,) = _problems(_write(tmp_path, "name: ../escape\n"))
    assert problem.startswith("line 1: name:")


def test_cross_section_rules(tmp_path):
    (problem,) = _problems(_write(tmp_path, "name: x\neval: {systems: [base, finetuned+rag]}\n"))
    assert "+rag" in problem and "no rag section" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\nmodel: {quantization: 4bit}\ntrain: {full_finetune: true}\n"))
    assert "quantization: none" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\nmodel: {ref: org/model, trust_remote_code: true}\n"))
    assert problem.startswith("line 2: model:") and "revision" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\nrag: {corpus: kb, chunk_tokens: 64, chunk_overlap: 64}\n"))
    assert "chunk_overlap" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\ndata: {rag: true}\nrag: {corpus: train}\n"))
    assert "own answer" in problem
    (problem,) = _problems(_write(tmp_path, "name: x\ntrain: {method: dpo, prompt_loss_weight: 0.1}\n"))
    assert "prompt_loss_weight" in problem and "DPO" in problem
    assert (
        load_experiment(
            _write(tmp_path, "name: x\ntrain: {method: dpo, prompt_loss_weight: 0}\n")
        ).train.prompt_loss_weight
        == 0
    )


def test_unknown_eval_system_is_named(tmp_path):
    (problem,) = _problems(_write(tmp_path, "name: x\neval: {systems: [base, gpt4]}\n"))
    assert "eval.systems" in problem and "gpt4" in problem


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, GOOD)
    exp = load_experiment(path, ["train.lr=3e-5", "lora.target_modules=[q_proj, v_proj]", "model.quantization=none"])
    assert exp.train.lr == pytest.approx(3e-5)
    assert exp.lora.target_modules == ["q_proj", "v_proj"]
    assert exp.model.quantization == "none" and exp.model.ref == "builtin:smollm2-135m-instruct"
    (problem,) = _problems(path, ["train.lrr=1"])
    assert problem.startswith("override train.lrr: unknown key") and "did you mean 'lr'" in problem
    with pytest.raises(ConfigError):
        parse_override("train.lr")


def test_yaml_syntax_error_names_the_line(tmp_path):
    (problem,) = _problems(_write(tmp_path, "name: x\ntrain:\n  lr: [1\n"))
    assert "line" in problem and "invalid YAML" in problem


def test_relative_paths_resolve_against_the_file(tmp_path):
    exp = load_experiment(_write(tmp_path, "name: x\ndata: {train: data/train.jsonl}\n", "sub.yaml"))
    assert exp.resolve_path(exp.data.train) == tmp_path / "data" / "train.jsonl"


def test_resolved_yaml_round_trips(tmp_path):
    exp = load_experiment(_write(tmp_path, GOOD), ["seed=7"])
    again = load_experiment(_write(tmp_path, exp.to_yaml(), "again.yaml"))
    assert again.model_dump() == exp.model_dump()


def test_every_field_is_documented_and_schema_is_json():
    from tuneforge.explain import explain

    text = explain()
    for key in ("train.lr", "train.extra_args", "train.price_per_1m_tokens", "rag.chunk_overlap", "data.clean.dedupe"):
        assert key in text

    def undocumented(model, prefix=""):
        from tuneforge.config_errors import models_in

        for name, field in model.model_fields.items():
            if not field.description:
                yield prefix + name
            for inner in models_in(field.annotation):
                yield from undocumented(inner, f"{prefix}{name}.")

    assert list(undocumented(Experiment)) == []
    schema = json.loads(json.dumps(Experiment.model_json_schema()))
    assert "train" in schema["properties"]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = _write(tmp_path, "name: x\nseed: 1\ntrain:\n  lr: 1.0e-4\n  lr: 2.0e-4\nseed: 2\n")
    problems = _problems(path)
    assert problems == [
        "line 5: train.lr: given twice (lines 4 and 5); keep one",
        "line 6: seed: given twice (lines 2 and 6); keep one",
    ]
