"""The training benchmarks' timing and counting (benchmarks/_timing.py): warm-up steps are left out of the timed
window, tokens are counted on the batches trained (accelerate collates one ahead), and the peak FLOPs are those of
the exact device. A tiny random Llama on the CPU, no downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _timing import (  # noqa: E402
    StepTimer,
    count_trained_tokens,
    matmul_params,
    peak_tflops,
    tag_token_counts,
    throughput,
)

WARM_UP_SECONDS = 100.0  # what a warm-up micro-batch takes on the fake clock (a measured one: 1 s)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def examples(n: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (n,), generator=generator).tolist()
    return [{"input_ids": list(range(1, k + 1)), "labels": [-100] + list(range(2, k + 1))} for k in lengths]


def pad(features: list[dict]) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainer_for(tmp_path, max_steps: int, grad_accum: int, collate):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    return Trainer(model=tiny_llama(), args=args, train_dataset=examples(), data_collator=collate)


class FakeClock:
    """The timer's clock, moved only by the training steps: a warm-up micro-batch takes WARM_UP_SECONDS, a later one
    1 s, so the figures do not depend on how busy the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_warm_up_steps_are_left_out_of_the_timed_window(tmp_path, monkeypatch):
    import _timing

    warmup, steps, accum = 2, 3, 2
    clock = FakeClock()
    monkeypatch.setattr(_timing, "time", clock)
    trainer = trainer_for(tmp_path, max_steps=20, grad_accum=accum, collate=pad)
    timer = StepTimer(warmup, steps)
    counts = count_trained_tokens(trainer, timer)
    train_one = trainer.training_step

    def timed(model, inputs, num_items_in_batch=None):
        clock.now += WARM_UP_SECONDS if trainer.state.global_step < warmup else 1.0
        return train_one(model, inputs, num_items_in_batch)

    trainer.training_step = timed
    trainer.add_callback(timer)
    trainer.train()
    assert timer.step_seconds == [accum * 1.0] * steps  # no warm-up time inside the window
    assert timer.first_step_seconds == accum * WARM_UP_SECONDS
    assert trainer.state.global_step == warmup + steps  # the timer stopped training once it had measured
    assert counts.batches == steps * accum  # only the measured steps' micro-batches


def test_tokens_are_counted_on_the_batches_trained_not_those_collated(tmp_path):
    collated = []
    trained = []

    def counting_collate(features):  # no attention mask, as with packed rows: only the tag says what is padding
        collated.append(features)
        batch = pad(features)
        del batch["attention_mask"]
        return batch

    steps = 4
    trainer = trainer_for(tmp_path, max_steps=steps, grad_accum=1, collate=tag_token_counts(counting_collate))
    trainer.model.register_forward_pre_hook(lambda _m, _a, kw: trained.append(kw["input_ids"]), with_kwargs=True)
    timer = StepTimer(warmup=0, steps=steps)
    counts = count_trained_tokens(trainer, timer)
    trainer.add_callback(timer)
    trainer.train()
    assert counts.batches == steps == len(trained)
    assert counts.padded == sum(ids.numel() for ids in trained)
    assert counts.real == sum(len(f["input_ids"]) for batch in collated[:steps] for f in batch)
    assert counts.real < counts.padded  # padding is not a real token
    assert counts.supervised == sum(len(f["labels"]) - 1 for batch in collated[:steps] for f in batch)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM5 part
        ("NVIDIA H100 SXM5 80GB", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", 65.0),
        ("NVIDIA A10G", None),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_is_the_exact_devices(name, peak):
    assert peak_tflops(name) == peak


def test_mfu_on_both_bases_from_the_measured_window():
    timer = StepTimer(warmup=1, steps=2)
    timer.step_seconds = [1.0, 3.0]
    counts = type("Counts", (), {"batches": 4, "real": 8000, "padded": 10000, "supervised": 1000})()
    out = throughput(timer, counts, n_params=7_505_000_000, device_name="NVIDIA H100 PCIe")
    assert out["tokens_per_s"] == 2000 and out["supervised_tokens_per_s"] == 250
    assert out["mfu_4n"] == pytest.approx(2000 * 4 * 7.505e9 / 756e12)
    assert out["mfu_6n"] == pytest.approx(1.5 * out["mfu_4n"])
    assert throughput(timer, counts, 7_505_000_000, "Some New GPU")["mfu_4n"] is None


def test_n_counts_the_head_but_not_the_embeddings():
    model = tiny_llama()
    layers = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    assert matmul_params(model) == layers + model.lm_head.weight.numel()
