"""Local training on a tiny Llama: the loss falls, only adapters change, the adapter folder is
complete, our loss equals the model's own, bad settings are refused before loading."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.config import load_experiment
from tuneforge.data.prepare import prepare
from tuneforge.errors import TuneforgeError
from tuneforge.run import RunDir

FACTS = [("What is two plus two?", "Four."), ("Say hello.", "hello world"), ("Capital of France?", "Paris."),
         ("Classify: positive", "positive"), ("Classify: negative", "negative")]


def make_run(tmp_path, model_dir, extra_train="", n=40, quantization="none"):
    data = tmp_path / "chats.jsonl"
    with open(data, "w") as fh:
        for i in range(n):
            q, a = FACTS[i % len(FACTS)]
            fh.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"name: tiny\nseed: 3\nmodel: {{ref: {model_dir}, quantization: {quantization}}}\n"
        f"data: {{train: {data}, valid_split: 0.2, max_length: 64, clean: {{dedupe: false}}}}\n"
        f"lora: {{r: 8, alpha: 32, dropout: 0.0}}\n"
        f"train: {{micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, eval_every: 5, save_every: 5, warmup_ratio: 0.1{extra_train}}}\n"
    )
    experiment = load_experiment(exp)
    run = RunDir(experiment, tmp_path / "run").start("train")
    prepare(experiment, run, progress=False)
    return experiment, run


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
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "generation_config.json", "tuneforge.json"} <= names
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


def test_every_trainable_parameter_changes_and_frozen_ones_do_not(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    from tuneforge.train import local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 3")
    before: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                moved = not torch.equal(before[name], param.detach())
                assert moved == param.requires_grad, name

    local.train_local(experiment, run, progress=False, callbacks=[Snapshot()])


def test_our_loss_equals_the_models_own(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from tuneforge.train.batching import Collator, build_rows
    from tuneforge.train.trainer import ForgeTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    examples = [(ids := torch.randint(3, 300, (n,)).tolist(), [-100] * (n // 2) + ids[n // 2 :]) for n in (12, 7, 20, 5)]
    rows = build_rows(examples, 32, packing=True, seed=0)
    batch = Collator(2, "block_mask")([r.__dict__ for r in rows])
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True})
    from datasets import Dataset

    trainer = ForgeTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
                           data_collator=lambda x: x)
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


def test_resume_refuses_changed_batch_settings(tmp_path, tiny_model_dir):
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 5")
    train_local(experiment, run, progress=False)
    changed = load_experiment(experiment._source, ["train.micro_batch_size=4", "train.max_steps=10"])
    with pytest.raises(TuneforgeError, match="micro_batch_size: was 2, now 4"):
        train_local(changed, RunDir(changed, run.path), resume=True, progress=False)


def test_non_finite_loss_stops_and_names_the_step(tmp_path, tiny_model_dir):
    from tuneforge.train.callbacks import NonFiniteError
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 30, lr: 1.0e+30, max_grad_norm: 0, warmup_ratio: 0")
    with pytest.raises(NonFiniteError, match=r"at step \d+|after step \d+"):
        train_local(experiment, run, progress=False)
    from safetensors.torch import load_file

    for saved in run.sub("checkpoints").glob("checkpoint-*/adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(saved).values())
    assert not run.sub("adapter").exists()


@pytest.mark.parametrize("variant", ["dora", "rslora", "full_finetune"])
def test_adapter_variants_and_full_finetune_train(tmp_path, tiny_model_dir, variant):
    from tuneforge.train.local import train_local

    experiment, run = make_run(tmp_path, tiny_model_dir, ", max_steps: 3" + (", full_finetune: true" if variant == "full_finetune" else ""))
    if variant != "full_finetune":
        experiment = load_experiment(experiment._source, [f"lora.{variant}=true"])
    summary = train_local(experiment, RunDir(experiment, run.path), progress=False)
    assert summary["steps"] == 3
    if variant == "full_finetune":
        assert summary["trainable_params"] == summary["total_params"]
        assert (run.sub("adapter") / "model.safetensors").exists()
    else:
        config = json.loads((run.sub("adapter") / "adapter_config.json").read_text())
        assert config["use_dora" if variant == "dora" else "use_rslora"] is True
