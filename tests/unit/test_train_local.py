"""Local training on a tiny Llama: the loss falls, only adapters change, the adapter folder is
complete, our loss equals the model's own, bad settings are refused before loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuneforge.config import load_experiment
from tuneforge.data.prepare import prepare
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_tokenizer
from tuneforge.run import RunDir

FACTS = [
    ("What is two plus two?", "Four."),
    ("Say hello.", "hello world"),
    ("Capital of France?", "Paris."),
    ("Classify: positive", "positive"),
    ("Classify: negative", "negative"),
]


def make_run(tmp_path, model_dir, extra_train="", n=40, quantization="none"):
    data = tmp_path / "chats.jsonl"
    with open(data, "w") as fh:
        for i in range(n):
            q, a = FACTS[i % len(FACTS)]
            fh.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"name: tiny\nseed: 3\nmodel: {{ref: {model_dir}, quantization: {quantization}}}\n"
        f"data: {{train: {data}, valid_split: 0.2, max_length: 64, clean: {{dedupe: false}}}}\n"
        f"lora: {{r: 8, alpha: 32, dropout: 0.0}}\n"
        "train: {micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, eval_every: 5, save_every: 5, "
        f"warmup_ratio: 0.1{extra_train}}}\n"
    )
    experiment = load_experiment(exp)
    run = RunDir(experiment, tmp_path / "run").start("train")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    return experiment, run


def labelled_run(tmp_path, model_dir, rows: int, cycle: list[str], text, train: str):
    """A prepared run over a review table whose labels follow `cycle`, with `train` as the train section's keys."""
    from tests.reviews import write_reviews

    write_reviews(tmp_path / "reviews.csv", rows, cycle, text)
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"name: tiny-labels\nseed: 3\nmodel: {{ref: {model_dir}, quantization: none}}\n"
        "data: {train: reviews.csv, template: {user: 'Review: {review}', assistant: '{sentiment}'}, "
        "label: sentiment, valid_split: 0.25}\n"
        f"lora: {{r: 8, alpha: 32, dropout: 0.0}}\ntrain: {{{train}}}\n"
    )
    experiment = load_experiment(exp)
    run = RunDir(experiment, tmp_path / "run").start("train")
    return experiment, run, prepare(experiment, run, load_tokenizer(experiment.model), progress=False)


@pytest.mark.slow
def test_loss_falls_only_adapters_change_and_adapter_is_complete(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 30")
    summary = train_local(experiment, run, progress=False)
    assert summary["steps"] == 30
    assert summary["final_eval_loss"] < summary["base_eval_loss"] * 0.9

    records = [json.loads(x) for x in run.sub("metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert records[0] == {"step": 0, "epoch": 0.0, "eval_loss": summary["base_eval_loss"]}
    assert all(r["tokens_per_s"] > 0 and r["supervised_tokens"] > 0 for r in records if "loss" in r)

    adapter = run.sub("adapter")
    names = {p.name for p in adapter.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "tuneforge.json",
    } <= names
    assert not any(n.endswith(".bin") for n in names)
    generation = json.loads((adapter / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]  # stops at end-of-turn

    trained = load_file(adapter / "adapter_model.safetensors")
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(trained[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: every one moved
    assert run.sub("plots", "training.png").exists() and list(run.sub("tensorboard").iterdir())
    markers = list(run.sub("checkpoints").glob("checkpoint-*/tuneforge_complete.json"))
    assert len(markers) == 2  # keep_checkpoints default 2
    assert json.loads(run.manifest_path.read_text())["train"]["steps"] == 30


@pytest.mark.slow
def test_every_trainable_parameter_changes_and_frozen_ones_do_not(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    from tuneforge.train import local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 3")
    before: dict[str, torch.Tensor] = {}
    compared: list[str] = []  # filled by on_train_end: a hook that never ran must not pass silently

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                moved = not torch.equal(before[name], param.detach())
                assert moved == param.requires_grad, name
                compared.append(name)

    local.train_local(experiment, run, progress=False, callbacks=[Snapshot()])
    assert before, "on_train_begin never took the snapshot"
    assert sorted(compared) == sorted(before), "on_train_end did not compare every parameter"


@pytest.mark.parametrize("architecture", ["llama", "gemma2-softcap"])
def test_our_loss_equals_the_models_own(tmp_path, tiny_model_dir, architecture):
    """Logits for the supervised positions only, with the model's own final soft-cap where it has one (Gemma 2)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator
    from tuneforge.train.trainer import ForgeTrainer

    torch.manual_seed(0)
    base = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if architecture == "llama"
        else Gemma2ForCausalLM(
            Gemma2Config(
                vocab_size=320,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                final_logit_softcapping=0.5,
                attn_implementation="eager",
            )
        )
    )  # a cap this low changes every logit
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    examples = [
        (ids := torch.randint(3, 300, (n,)).tolist(), [-100] * (n // 2) + ids[n // 2 :]) for n in (12, 7, 20, 5)
    ]
    rows = build_rows(examples, 32, packing=True, seed=0)
    batch = Collator(2, "block_mask")([r.__dict__ for r in rows])
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
    )
    from datasets import Dataset
    from transformers import AutoTokenizer

    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        reference = model(**batch).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bad_extra_args_and_missing_data_are_refused_before_loading(tmp_path, tiny_model_dir):
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", extra_args: {lr_scheduler_kwarg: {}}")
    with pytest.raises(TuneforgeError, match="lr_scheduler_kwarg.*did you mean 'lr_scheduler_kwargs'"):
        train_local(experiment, run, progress=False)
    experiment, run = make_run(tmp_path, tiny_model_dir)
    (run.sub("data") / "train.jsonl").unlink()
    with pytest.raises(TuneforgeError, match="run `tuneforge prepare` first"):
        train_local(experiment, run, progress=False)


@pytest.mark.slow
def test_resume_refuses_changed_batch_settings(tmp_path, tiny_model_dir):
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 5")
    train_local(experiment, run, progress=False)
    changed = load_experiment(experiment._source, ["train.micro_batch_size=4"])
    with pytest.raises(TuneforgeError, match="micro_batch_size: was 2, now 4"):
        train_local(changed, RunDir(changed, run.path), resume=True, progress=False)
    # what the optimizer, its schedule and the adapter's shape depend on counts too
    for override, named in (
        ("train.lr=0.01", "lr: was"),
        ("lora.r=4", "lora: was"),
        ("train.max_steps=10", "steps: was 5, now 10"),
        ("model.quantization=4bit", "quantization: was 'none', now '4bit'"),
    ):
        changed = load_experiment(experiment._source, [override])
        with pytest.raises(TuneforgeError, match=named):
            train_local(changed, RunDir(changed, run.path), resume=True, progress=False)


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_the_step(tmp_path, tiny_model_dir):
    from tuneforge.train.callbacks import NonFiniteError
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 30, max_grad_norm: 0")
    experiment = load_experiment(experiment._source, ["train.lr=1.0e+30", "train.warmup_ratio=0"])
    with pytest.raises(NonFiniteError, match=r"at step \d+|after step \d+"):
        train_local(experiment, run, progress=False)
    from safetensors.torch import load_file

    for saved in run.sub("checkpoints").glob("checkpoint-*/adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(saved).values())
    assert not run.sub("adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dora", "rslora", "full_finetune"])
def test_adapter_variants_and_full_finetune_train(tmp_path, tiny_model_dir, variant):
    from tuneforge.train.local import train_local

    experiment, run = make_run(
        tmp_path, tiny_model_dir, ", max_steps: 3" + (", full_finetune: true" if variant == "full_finetune" else "")
    )
    if variant != "full_finetune":
        experiment = load_experiment(experiment._source, [f"lora.{variant}=true"])
    summary = train_local(experiment, RunDir(experiment, run.path), progress=False)
    assert summary["steps"] == 3
    if variant == "full_finetune":
        assert summary["trainable_params"] == summary["total_params"]
        # a whole model where every verb looks for one: `finetuned` loads it, eval and merge know it
        from tuneforge.engine.transformers import Engine, Settings, system_source

        assert not run.sub("adapter").exists() and (run.sub("merged") / "config.json").exists()
        assert system_source("finetuned", run) == (None, str(run.sub("merged")))
        engine = Engine.load(experiment, "finetuned", run)
        assert (
            engine.generate(
                [[{"role": "user", "content": "What is the capital of France?"}]], Settings(max_new_tokens=4)
            )[0].completion_tokens
            > 0
        )
        trained = dict(engine.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
        from transformers import AutoModelForCausalLM

        base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())[
            "model.layers.0.self_attn.q_proj.weight"
        ]
        assert not torch.allclose(trained, base)  # the trained weights, not the base's
        from tuneforge.merge import merge

        with pytest.raises(TuneforgeError, match="already holds the full model"):
            merge(experiment, run)
    else:
        config = json.loads((run.sub("adapter") / "adapter_config.json").read_text())
        assert config["use_dora" if variant == "dora" else "use_rslora"] is True


@pytest.mark.slow
def test_the_kept_adapter_is_the_best_evaluations_checkpoint(tmp_path, tiny_model_dir):
    """Validation says step 10 was best (the callback makes it so): the adapter kept is that checkpoint's, not the
    last."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from tuneforge.train.local import train_local

    class BestAtTen(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step:
                metrics["eval_loss"] = 0.01 if state.global_step == 10 else 5.0

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 20")
    summary = train_local(experiment, run, progress=False, callbacks=[BestAtTen()])
    assert summary["kept_step"] == 10 and "lowest valid loss" in summary["kept_because"]
    kept = load_file(run.sub("adapter", "adapter_model.safetensors"))
    best = load_file(run.sub("checkpoints", "checkpoint-10", "adapter_model.safetensors"))
    last = load_file(run.sub("checkpoints", "checkpoint-20", "adapter_model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in kept)
    assert any(not torch.equal(kept[k], last[k]) for k in kept)
    assert json.loads(run.sub("adapter", "tuneforge.json").read_text())["training"]["kept_step"] == 10


@pytest.mark.slow
def test_labelled_training_logs_valid_accuracy_and_keeps_the_best_step(tmp_path, tiny_model_dir):
    from tuneforge.train.local import train_local

    words = {"positive": "great lovely", "negative": "awful broken", "neutral": "fine okay"}
    experiment, run, report = labelled_run(
        tmp_path,
        tiny_model_dir,
        60,
        ["positive", "positive", "negative", "neutral"],
        lambda label, i: f"{words[label]} thing {i}",
        "max_steps: 12, lr: 5.0e-3, warmup_ratio: 0.1, prompt_loss_weight: 0.1",
    )
    assert (
        report["labels"]["valid"]["majority_label"] == "positive"
        and report["labels"]["valid"]["majority_accuracy"] == 0.5
    )
    assert (
        report["local"]["packing"] is False and report["local"]["eval_every"] == 3
    )  # 12 steps, five evaluations a run
    markdown = run.sub("data", "report.md").read_text()
    assert (
        "| valid | 4 (25%) | 4 (25%) | 8 (50%) | 0.500 (positive) |" in markdown
    )  # the labels and the floor per split
    assert "## Training plan (local)" in markdown and "packing off: labelled data" in markdown
    summary = train_local(experiment, run, progress=False)

    records = [json.loads(x) for x in run.sub("metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evaluated] == [0, 3, 6, 9, 12]
    assert all(0 <= r["eval_macro_f1"] <= 1 and r["eval_loss"] > 0 for r in evaluated)
    # with a prompt loss the logged loss stays the answer's, and the prompt's sits beside it
    assert report["local"]["prompt_loss_weight"] == 0.1
    trained = [r for r in records if "loss" in r]
    assert trained and all(r["prompt_loss"] > 0 and r["loss"] >= 0 for r in trained)
    # the kept evaluation's record of which valid examples it got right travels with the newest checkpoint
    state = json.loads(run.sub("checkpoints", "checkpoint-12", "label_selection.json").read_text())
    kept = next(r for r in evaluated if r["step"] == summary["kept_step"])
    assert state["step"] == summary["kept_step"] and summary["valid_accuracy"] == kept["eval_accuracy"]
    assert sum(state["correct"]) / len(state["correct"]) == pytest.approx(kept["eval_accuracy"])
    assert summary["base_valid_accuracy"] == evaluated[0]["eval_accuracy"]
    assert summary["majority_accuracy"] == 0.5 and summary["majority_label"] == "positive"
    assert ("warning" in summary) == (summary["valid_accuracy"] <= 0.5)
    from PIL import Image

    with Image.open(run.sub("plots", "training.png")) as image:
        assert image.width > 1.8 * image.height  # the loss panel and the valid accuracy panel side by side


def test_a_later_evaluation_is_kept_unless_an_earlier_one_is_better_beyond_chance():
    import numpy as np

    from tuneforge.train.label_eval import LabelEval, kept_is_better

    right = np.ones(45, dtype=bool)
    one_less = right.copy()
    one_less[0] = False
    assert not kept_is_better(right, one_less)  # one example of 45: noise, the later evaluation wins
    collapsed = np.zeros(45, dtype=bool)
    collapsed[:29] = True  # 16 fewer right: a run that degraded
    assert kept_is_better(right, collapsed) and not kept_is_better(collapsed, right)
    five_of_six = right.copy()
    five_of_six[:6] = [False, True, True, True, True, True]
    mixed = right.copy()
    mixed[:6] = [True, False, False, False, False, False]
    assert not kept_is_better(mixed, five_of_six) and kept_is_better(five_of_six, mixed) is False  # 5 vs 1: p = 0.11

    judge = LabelEval.__new__(LabelEval)
    judge.kept = None
    scores = [
        judge.select(10, one_less),
        judge.select(20, right),
        judge.select(30, collapsed),
        judge.select(40, one_less),
    ]
    assert (
        scores[1] > scores[0] and scores[2] < scores[1] and scores[3] > scores[1]
    )  # the trainer keeps the argmax: step 40
    assert judge.kept["step"] == 40  # compared with step 20 (kept), not with the rejected step 30


@pytest.mark.slow
def test_a_run_that_degrades_keeps_its_earlier_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """Scripted valid scores: every label right at step 3, then most wrong. The adapter kept is step 3's."""
    import numpy as np
    from safetensors.torch import load_file

    from tuneforge.train.label_eval import LabelEval
    from tuneforge.train.local import train_local

    experiment, run, _ = labelled_run(
        tmp_path,
        tiny_model_dir,
        80,
        ["positive", "negative"],
        lambda label, i: f"{label} words {i}",
        "max_steps: 9, eval_every: 3, lr: 5.0e-3",
    )
    calls = []

    def scripted(self, model, batch_size):
        calls.append(len(calls))
        right = np.where(np.arange(len(self.labels))[None, :] == self.truth[:, None], -0.1, -3.0)
        if len(calls) > 2:  # after step 3, four of every five examples go wrong
            wrong = np.arange(len(self.truth)) % 5 != 0
            right[wrong] = -right[wrong] - 3.1
        return right, np.ones_like(right)

    monkeypatch.setattr(LabelEval, "score", scripted)
    summary = train_local(experiment, run, progress=False)
    assert summary["kept_step"] == 3 and "beyond chance" in summary["kept_because"]
    kept = load_file(run.sub("adapter", "adapter_model.safetensors"))
    best = load_file(run.sub("checkpoints", "checkpoint-3", "adapter_model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in kept)


def test_balanced_label_weights_weigh_each_class_equally(tiny_model_dir):
    from tuneforge.data.packing import build_rows
    from tuneforge.data.records import Example
    from tuneforge.train.batching import Collator
    from tuneforge.train.local import label_weights

    examples = [Example([], str(i), "", label) for i, label in enumerate(["a"] * 6 + ["b"] * 2)]
    weights = label_weights(examples, "balanced")
    assert sum(weights) == pytest.approx(len(examples))  # mean 1: the loss keeps its scale
    assert sum(w for w, e in zip(weights, examples) if e.label == "a") == pytest.approx(
        sum(w for w, e in zip(weights, examples) if e.label == "b")
    )
    assert label_weights(examples, "none") is None
    rows = build_rows(
        [([5, 6, 7], [-100, 6, 7])] * 2 + [([8, 9], [-100, 9])], 16, packing=True, seed=0, weights=[3.0, 3.0, 0.5]
    )
    batch = Collator(2, "block_mask")([r.__dict__ for r in rows])
    for b, row in enumerate(rows):
        start = 0
        for length, weight in zip(row.seq_lens, row.weights):
            assert batch["loss_weights"][b, start : start + length].eq(weight).all()
            start += length


def test_weighted_loss_is_the_weighted_mean_of_token_losses(tmp_path, tiny_model_dir):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator
    from tuneforge.train.trainer import ForgeTrainer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    examples = [(ids := torch.randint(3, 300, (n,)).tolist(), [-100] * (n - 3) + ids[n - 3 :]) for n in (12, 7, 20)]
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
    )
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
    )
    model.eval()
    plain = [
        trainer.compute_loss(model, dict(Collator(2, "padded")([build_rows([e], 32, False, 0)[0].__dict__]))).item()
        for e in examples
    ]
    rows = build_rows(examples, 32, packing=False, seed=0, weights=[2.0, 0.5, 1.0])
    with torch.no_grad():
        weighted = trainer.compute_loss(model, dict(Collator(2, "padded")([r.__dict__ for r in rows])))
    # every example has three supervised tokens, so the batch mean weighs each example's mean loss by its weight
    expected = (2.0 * plain[0] + 0.5 * plain[1] + 1.0 * plain[2]) / 3
    assert weighted.item() == pytest.approx(expected, rel=1e-4)


def test_a_quantized_models_adapters_train_in_fp32_unless_the_device_computes_in_bf16(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    from tuneforge.train.local import keep_trainable_fp32, train_local

    seen: dict = {}

    class Dtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["optimizer"] = {p.dtype for group in kwargs["optimizer"].param_groups for p in group["params"]}

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 1", quantization="4bit")
    train_local(experiment, run, progress=False, callbacks=[Dtypes()])
    assert seen["trainable"] == {torch.float32} == seen["optimizer"]  # TRL had cast them to bf16

    # a T4-style fp16 plan keeps fp32 adapters (fp16's grad scaler cannot unscale bf16 gradients); a bf16 one is
    # left as TRL made it
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert keep_trainable_fp32(model, "float16") == 2 and model.weight.dtype == torch.float32
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert keep_trainable_fp32(model, "bfloat16") == 0 and model.weight.dtype == torch.bfloat16


def test_a_sharded_models_gathered_weights_are_what_is_saved(tmp_path, tiny_model_dir):
    """Under FSDP each process holds a shard, so finish saves the full state dict all processes gathered
    (common.full_weights), not the main process's own parameters."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.train.common import full_weights
    from tuneforge.train.finish import save_adapter

    experiment, _ = make_run(tmp_path, tiny_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    tokenizer = load_tokenizer(experiment.model)
    gathered = {k: v + 1.0 for k, v in model.state_dict().items()}  # stands for the weights the shards add up to
    save_adapter(model, tokenizer, ChatEncoder(tokenizer), experiment, tmp_path / "adapter", {}, "none", gathered)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved and len(saved) == len(own)
    for key, value in saved.items():
        original = next(v for k, v in own.items() if k.replace(".default", "") == key)
        assert torch.equal(value, original + 1.0)
    assert (
        full_weights(type("Plain", (), {"is_fsdp_enabled": False})()) is None
    )  # unsharded: each process has the model


def test_label_adjustment_shifts_the_label_logits_where_an_answer_starts_and_nowhere_else(tmp_path, tiny_model_dir):
    """The loss with train.label_adjustment equals cross-entropy of the model's logits with tau x log(prior) added to
    the labels' first tokens at the first target of each answer; other positions and tokens are untouched."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator
    from tuneforge.train.local import label_offsets
    from tuneforge.train.trainer import ForgeTrainer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    # two examples: a prompt, then a label (first token 40 or 41) and an end-of-turn (2)
    examples = [([7, 8, 9, 10, 40, 2], [-100] * 4 + [40, 2]), ([7, 8, 11, 41, 2], [-100] * 3 + [41, 2])]
    labelled = [type("E", (), {"label": "common"})(), type("E", (), {"label": "rare"})()] * 2
    offsets, note = label_offsets(examples * 2 + [examples[0]], labelled + [labelled[0]], 0.5)  # 3 common : 2 rare
    assert offsets == pytest.approx({40: 0.5 * math.log(3 / 5), 41: 0.5 * math.log(2 / 5)}) and "common 60%" in note
    batch = Collator(2, "padded")([r.__dict__ for r in build_rows(examples, 32, packing=False, seed=0)])
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
    )
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        label_offsets=offsets,
    )
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        for row in range(2):
            start = int((targets[row] != -100).nonzero()[0])  # where the label is predicted
            for token, offset in offsets.items():
                logits[row, start, token] += offset
        chosen = targets != -100
        reference = torch.nn.functional.cross_entropy(logits[chosen], targets[chosen])
        plain = torch.nn.functional.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()[chosen],
            targets[chosen],
        )
    assert torch.allclose(ours, reference, atol=1e-5) and not torch.allclose(ours, plain, atol=1e-3)

    # labels that begin with the same token cannot be told apart by one logit: the adjustment is off, and says so
    tokens = [([5, 6, 7], [-100, 8, 9]), ([5, 6, 7], [-100, 8, 10])]
    examples = [type("E", (), {"label": "very good"})(), type("E", (), {"label": "very bad"})()]
    offsets, note = label_offsets(tokens, examples, 1.0)
    assert offsets is None and "off" in note
    assert label_offsets(tokens, examples, 0.0) == (None, "")


def test_prompt_targets_stay_inside_each_example_and_off_padding_and_answers():
    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator

    examples = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10, 11], [-100, -100, 11]), ([12, 13], [-100, 13])]
    rows = build_rows(examples, 16, packing=True, seed=0)
    for mode in ("block_mask", "padded", "flash_varlen"):
        batch = Collator(2, mode, prompt_targets=True)([r.__dict__ for r in rows])
        ids, marks = batch["input_ids"], batch["prompt_index"]
        # the tokens predicted as prompt text: the second prompt token of the two examples that have one, nothing else
        predicted = sorted(ids.reshape(-1)[marks + 1].tolist())
        assert predicted == [6, 10], (mode, predicted)
        # and the head's rows: exactly the positions whose next token is a label, in order
        targets = ids.reshape(-1)[batch["head_index"] + 1].tolist()
        assert targets == [7, 8, 11, 13] and batch["supervised"] == 4, (mode, targets)
    assert "prompt_index" not in Collator(2, "padded")([r.__dict__ for r in rows])


def test_prompt_loss_adds_weight_times_the_mean_next_token_loss_on_prompt_text(tmp_path, tiny_model_dir, monkeypatch):
    import torch.nn.functional as F
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train import batching
    from tuneforge.train.batching import Collator
    from tuneforge.train.trainer import ForgeTrainer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    examples = [(ids := torch.randint(3, 300, (n,)).tolist(), [-100] * (n - 2) + ids[n - 2 :]) for n in (12, 7, 20)]
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
    )
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
        prompt_loss_weight=0.5,
    )
    model.train()  # the prompt loss is a training loss; dropout is 0 in LoRA's default and the tiny model's
    rows = build_rows(examples, 64, packing=True, seed=0)
    batch = Collator(2, "block_mask", prompt_targets=True)([r.__dict__ for r in rows])
    with torch.no_grad():
        combined = trainer.compute_loss(model, dict(batch)).item()
        answer_only = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "prompt_index"}).item()
        # by hand: each example alone, full logits, next-token loss on its prompt tokens after the first
        losses = []
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            prompt_positions = [t for t in range(len(ids) - 1) if labels[t + 1] == -100]
            losses += F.cross_entropy(
                logits[prompt_positions], torch.tensor(ids)[1:][prompt_positions], reduction="none"
            ).tolist()
    assert combined - answer_only == pytest.approx(0.5 * sum(losses) / len(losses), rel=1e-3)
    model.eval()
    with torch.no_grad():  # evaluation keeps the answer's loss alone
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(answer_only, rel=1e-5)
    model.train()
    rows_seen = []
    hook = trainer._head.register_forward_hook(lambda _m, args, _o: rows_seen.append(args[0].shape[0]))
    monkeypatch.setattr(batching, "PROMPT_LOSS_POSITIONS", 5)
    batch = Collator(2, "block_mask", prompt_targets=True)([r.__dict__ for r in rows])
    with torch.no_grad():  # a micro-batch with more prompt tokens than the cap projects a random sample of them
        trainer.compute_loss(model, dict(batch))
    hook.remove()
    assert rows_seen == [int((batch["labels"][:, 1:] != -100).sum()) + 5] and len(losses) > 5
