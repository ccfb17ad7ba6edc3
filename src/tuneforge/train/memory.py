"""Activation checkpointing chosen from what this model's layers really keep per token, against the memory free.

Without checkpointing, every decoder layer keeps its activations for the backward pass: on the Llama-3.1-8B layer
shape about 221 KiB a token (7 MiB over 32 layers; half of it the MLP's wide tensors, a third the fp32 copies of
RMSNorm's upcast). Checkpointing a layer keeps only its input (hidden size x 2 bytes) and computes the rest again in
the backward pass, about a third more compute for that layer. So the plan measures the slope on the loaded model (two
short forward passes with saved-tensor hooks, parameters not counted), and checkpoints no more layers than the
micro-batch needs to fit: none, one layer in k (transformers' `every_n_layers`), or every layer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from tuneforge.train.wrapped import causal_lm

SAFETY = 0.8  # of the free memory: allocator fragmentation, cuBLAS workspaces, the optimizer's temporaries
EVERY_N = (8, 4, 2, 1)  # partial checkpointing tried before full: one layer in 8, 4, 2, then all


@dataclass(frozen=True)
class Checkpointing:
    enabled: bool
    every_n_layers: int  # with enabled: 1 is every layer
    reason: str
    bytes_per_token_layer: float | None = None  # measured, when the plan measured it

    def describe(self) -> str:
        if not self.enabled:
            what = "off"
        elif self.every_n_layers == 1:
            what = "every layer"
        else:
            what = f"one layer in {self.every_n_layers}"
        return f"activation checkpointing {what}: {self.reason}"

    def trainer_kwargs(self, config_class) -> dict:
        """The trainer arguments that do it, under the name this transformers uses."""
        fields = config_class.__dataclass_fields__
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs = {"use_reentrant": False}
        if self.enabled and self.every_n_layers > 1:
            kwargs["every_n_layers"] = self.every_n_layers
        return {name: self.enabled, f"{name}_kwargs": kwargs}


def activation_bytes_per_token(model, vocab_size: int, layers: int, autocast: torch.dtype | None = None) -> float:
    """Bytes that one more token makes the forward pass keep for the backward pass, per decoder layer, measured on
    this model as it will train (its adapters, dtype, kernels and dropout), from two lengths so that anything not
    proportional to the tokens drops out. The head projects one row, as the training step projects few."""
    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    head = _head(model)
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].reshape(-1, args[0].shape[-1])[:1],))
    was_training = model.training
    model.train()
    devices = [device] if device.type == "cuda" else []
    try:  # the measurement draws dropout masks: the training's random stream must not see them
        with torch.random.fork_rng(devices=devices):
            sizes = [_saved_bytes(model, tokens, vocab_size, device, params, autocast) for tokens in (64, 192)]
    finally:
        handle.remove()
        model.train(was_training)
    return max(sizes[1] - sizes[0], 0) / 128 / max(layers, 1)


def _saved_bytes(model, tokens, vocab_size, device, params, autocast) -> int:
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (1, tokens), generator=generator).to(device)
    positions = torch.arange(tokens, device=device)[None]
    context = torch.autocast(device.type, dtype=autocast) if autocast else _nothing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        out = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    del out
    return sum(kept.values())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _head(model):
    return causal_lm(model).get_output_embeddings()


def free_bytes(device: str) -> int:
    """Memory free for this process's activations now: the GPU's, or the machine's available RAM."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_checkpointing(
    per_token_layer: float, layers: int, hidden_bytes: int, tokens: int, reserved: int, free: int
) -> Checkpointing:
    """The fewest checkpointed layers whose activations for `tokens` fit SAFETY x `free` less `reserved` (optimizer
    states, gradients, logits). Checkpointing one layer in k keeps ceil(layers / k) layer inputs instead of their
    activations, plus one layer's activations while it is recomputed."""
    budget = SAFETY * free - reserved
    per_token = f"{per_token_layer / 1024:,.0f} KiB per token per layer (measured)"
    full_need = tokens * layers * per_token_layer
    if full_need <= budget:
        why = f"{per_token}: {tokens:,} tokens x {layers} layers need {_gib(full_need)} of {_gib(budget)} usable"
        return Checkpointing(False, 1, why, per_token_layer)
    for every in EVERY_N:
        checkpointed = math.ceil(layers / every)
        need = tokens * ((layers - checkpointed) * per_token_layer + checkpointed * hidden_bytes + per_token_layer)
        if need <= budget or every == 1:
            fits = "fit" if need <= budget else "still do not fit: lower train.micro_batch_size"
            why = (
                f"{per_token}: {tokens:,} tokens x {layers} layers would need {_gib(full_need)}, "
                f"{_gib(budget)} usable; checkpointed they need {_gib(need)} and {fits}"
            )
            return Checkpointing(True, every, why, per_token_layer)
    raise AssertionError("EVERY_N ends with 1")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def choose_checkpointing(setting, model, plan, tokens: int, trainable: int) -> Checkpointing:
    """train.gradient_checkpointing: true or false as set; auto measured on this model for a micro-batch of `tokens`
    on `plan`'s device (a tuneforge.models.DevicePlan)."""
    if setting != "auto":
        return Checkpointing(bool(setting), 1, "set in the experiment file")
    config = _config(model)
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    width = 4 if plan.dtype == "float32" and not plan.autocast else 2
    autocast = torch.bfloat16 if plan.autocast == "bfloat16" else None
    per_token_layer = activation_bytes_per_token(model, vocab, layers, autocast)
    # fp32 gradients and Adam's two moments per trainable weight; the head's output and its gradient for every row,
    # and one chunk of the loss's fp32 log-probabilities (trainer.CE_CHUNK_ROWS)
    reserved = trainable * 12 + tokens * vocab * width * 2 + 1024 * vocab * 4 * 3
    return plan_checkpointing(per_token_layer, layers, hidden * width, tokens, reserved, free_bytes(plan.device))


def _config(model):
    config = causal_lm(model).config
    return getattr(config, "text_config", None) or config
