"""The training step's cost: no host syncs in the loss, a chunked loss equal to the plain one, and activation
checkpointing planned from a measured activation cost."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tuneforge.data.packing import build_rows
from tuneforge.train.batching import Collator
from tuneforge.train.memory import (
    Checkpointing,
    activation_bytes_per_token,
    choose_checkpointing,
    plan_checkpointing,
)
from tuneforge.train.trainer import chunked_cross_entropy

# calls whose result the host must wait for on a GPU (a value read back, or a shape that depends on values)
READS_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "masked_select", "unique"}


class HostReads(TorchFunctionMode):
    """Records torch calls made from tuneforge's own code that would make the host wait for the GPU."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and _has_bool_tensor(args[1] if len(args) > 1 else None)
        if name in READS_BACK or boolean_index:
            caller = next(
                (f for f in reversed(traceback.extract_stack()[:-1]) if "/tuneforge/" in f.filename),
                None,
            )
            if caller is not None and "/tests/" not in caller.filename:
                self.found.append(f"{name} at {caller.filename.split('/tuneforge/')[-1]}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _trainer(tmp_path, model, tokenizer, **kwargs):
    from datasets import Dataset
    from trl import SFTConfig

    from tuneforge.train.trainer import ForgeTrainer

    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
    )
    return ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
        processing_class=tokenizer,
        **kwargs,
    )


def _batch(vocab, prompt_targets=False, weights=False):
    torch.manual_seed(1)
    examples = [(ids := torch.randint(3, vocab, (n,)).tolist(), [-100] * (n - 4) + ids[n - 4 :]) for n in (12, 7, 20)]
    w = [1.0, 2.0, 0.5] if weights else None
    rows = build_rows(examples, 24, packing=True, seed=0, weights=w)
    return Collator(2, "block_mask", prompt_targets=prompt_targets)([r.__dict__ for r in rows])


@pytest.mark.parametrize("extra", [{}, {"prompt_loss_weight": 0.5}, {"label_offsets": {7: 0.3, 9: -0.2}}])
def test_the_training_loss_reads_nothing_back_from_the_device(tmp_path, tiny_llama, tiny_tokenizer, extra):
    """On a GPU every read-back waits for the queued kernels: one per micro-batch starves the GPU between steps. The
    old loss read the supervised count, indexed the head's rows with a boolean mask and read its accuracy back."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    trainer = _trainer(tmp_path, model, tiny_tokenizer, **extra)
    batch = _batch(model.config.vocab_size, prompt_targets="prompt_loss_weight" in extra, weights=True)
    model.train()
    spy = HostReads()
    with spy:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(11))
        loss.backward()
    assert spy.found == []
    assert torch.isfinite(loss) and trainer.supervised_tokens == batch["supervised"] > 0
    trainer.log({"loss": 1.0})  # the metrics leave the device at the log line, as numbers
    assert isinstance(trainer.state.log_history[-1]["mean_token_accuracy"], float)


def test_the_chunked_loss_equals_the_plain_loss_and_its_gradients(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.rand(37, dtype=torch.float64)
    for w in (None, weights):
        plain = (
            F.cross_entropy(logits, targets, reduction="sum")
            if w is None
            else (F.cross_entropy(logits, targets, reduction="none") * w).sum()
        )
        (expected,) = torch.autograd.grad(plain, logits)
        chunked = chunked_cross_entropy(logits, targets, w, chunk=8)
        (got,) = torch.autograd.grad(chunked, logits)
        assert torch.allclose(chunked.double(), plain) and torch.allclose(got.double(), expected)
    empty = chunked_cross_entropy(logits[:0], targets[:0])
    assert empty.item() == 0 and empty.requires_grad  # a micro-batch with nothing supervised still backpropagates


def test_the_chunked_loss_keeps_no_fp32_copy_of_all_the_logits():
    """The plain loss saves [rows, vocab] fp32 log-probabilities for its backward; chunked and recomputed, what is
    saved is the head's bf16 output (a view of it per chunk)."""
    logits = torch.randn(64, 1000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))

    def saved_fp32(fn) -> int:
        sizes = []

        def pack(t):
            if t.dtype == torch.float32:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    assert saved_fp32(lambda: F.cross_entropy(logits.float(), targets, reduction="sum")) >= 64 * 1000
    assert saved_fp32(lambda: chunked_cross_entropy(logits, targets, chunk=16)) == 0


def test_activation_cost_is_measured_per_token_and_layer_and_grows_with_the_mlp(tiny_llama):
    from transformers import LlamaForCausalLM

    small = copy.deepcopy(tiny_llama).float()
    config = copy.deepcopy(small.config)
    config.intermediate_size *= 4
    wide = LlamaForCausalLM(config).float()
    a = activation_bytes_per_token(small, config.vocab_size, config.num_hidden_layers)
    b = activation_bytes_per_token(wide, config.vocab_size, config.num_hidden_layers)
    hidden = config.hidden_size * 4
    # each layer keeps at least its norms' and projections' inputs; the parameters are not counted
    assert 4 * hidden < a < 100 * hidden
    # the MLP keeps gate, up and their product: 3 x the extra intermediate width x 4 bytes, at least
    assert b - a >= 3 * (config.intermediate_size - tiny_llama.config.intermediate_size) * 4


def test_checkpointing_checkpoints_only_the_layers_that_must_be():
    kib = 1024
    fits = plan_checkpointing(221 * kib, 32, 8 * kib, 8192, reserved=0, free=80 * 2**30)
    assert not fits.enabled and "55.2 GiB" in fits.reason and "64.0 GiB usable" in fits.reason
    partial = plan_checkpointing(221 * kib, 32, 8 * kib, 8192, reserved=0, free=60 * 2**30)
    assert partial.enabled and partial.every_n_layers in (2, 4, 8) and "fit" in partial.reason
    full = plan_checkpointing(221 * kib, 32, 8 * kib, 8192, reserved=2 * 2**30, free=12 * 2**30)
    assert full.enabled and full.every_n_layers == 1
    hopeless = plan_checkpointing(221 * kib, 32, 8 * kib, 8192, reserved=0, free=2**30)
    assert hopeless.every_n_layers == 1 and "lower train.micro_batch_size" in hopeless.reason
    assert partial.trainer_kwargs(_Config)["activation_checkpointing_kwargs"]["every_n_layers"] > 1
    assert full.describe().startswith("activation checkpointing every layer: ")


class _Config:
    __dataclass_fields__ = {"activation_checkpointing": None}


def test_a_set_value_is_kept_and_auto_is_measured(tiny_llama, monkeypatch):
    from tuneforge.models import DevicePlan
    from tuneforge.train import memory

    plan = DevicePlan("cpu", "float32", "sdpa", "none", "cpu")
    assert choose_checkpointing(True, tiny_llama, plan, 1024, 0) == Checkpointing(True, 1, "set in the experiment file")
    assert not choose_checkpointing(False, tiny_llama, plan, 1024, 0).enabled
    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 * 2**20)
    tight = choose_checkpointing("auto", tiny_llama, plan, 65536, 0)
    assert tight.enabled and tight.bytes_per_token_layer > 0 and "measured" in tight.reason
    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 * 2**30)
    assert not choose_checkpointing("auto", tiny_llama, plan, 1024, 0).enabled


@pytest.mark.slow
def test_compiled_layers_give_the_eager_logits_and_gradients(tiny_llama):
    """Regional compilation traced through PEFT's LoRA layers (aot_eager here: the trace and its autograd, which is
    what could go wrong on any device; inductor's code generation for CUDA is measured by benchmarks/gpu_perf.py)."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.train.kernels import choose_compilation, compile_layers

    torch.manual_seed(0)
    eager = get_peft_model(copy.deepcopy(tiny_llama).float(), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in eager.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a trained adapter, not a zero one
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, backend="aot_eager") == tiny_llama.config.num_hidden_layers
    ids = torch.randint(3, tiny_llama.config.vocab_size, (2, 24))
    results = []
    for model in (eager, compiled):
        model.train()
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert all(torch.allclose(g, results[1][1][n], atol=1e-5) for n, g in results[0][1].items())
    assert not choose_compilation("auto", "cuda").enabled and choose_compilation(True, "cpu").enabled


def test_on_a_gpu_logs_come_every_few_steps_always_at_a_save_and_workers_collate_ahead():
    from tuneforge.train.common import _loading, logging_steps

    assert logging_steps("cpu", 20) == 1  # a CPU step takes seconds: every step
    assert logging_steps("cuda", 20) == 10 and logging_steps("cuda", 12) == 6 and logging_steps("cuda", 17) == 1
    assert all(save % logging_steps("cuda", save) == 0 for save in range(1, 200))
    assert _loading("cpu") == {"dataloader_num_workers": 0}
    gpu = _loading("cuda")
    assert gpu["dataloader_num_workers"] > 0 and gpu["dataloader_pin_memory"]
