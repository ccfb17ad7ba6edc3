"""Fused kernels for the decoder layers: each layer compiled on its own by torch.compile (regional compilation).

Inductor fuses what the eager layer runs as separate kernels: RMSNorm's fp32 upcast, mean, rsqrt and scale; SwiGLU's
gate, activation and product; RoPE's rotations; LoRA's scaling and add. It also keeps fewer intermediates for the
backward pass. Compiling each layer, not the whole model, compiles one layer's graph once and reuses it for every
layer, and keeps the loss, the head's row selection and PEFT's wrappers in eager mode.

`train.compile: auto` stays off until a GPU run of benchmarks/gpu_perf.py (its `tuneforge-compile` side) measures it
faster than eager; a CPU gains nothing from it and pays minutes of compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compilation:
    enabled: bool
    reason: str

    def describe(self) -> str:
        return f"compile {'on' if self.enabled else 'off'}: {self.reason}"


def choose_compilation(setting, device: str) -> Compilation:
    """train.compile as set, or auto's choice for this device."""
    if setting != "auto":
        return Compilation(bool(setting), "set in the experiment file")
    if device != "cuda":
        return Compilation(False, "on a CPU compilation takes minutes and the step gains nothing from it")
    return Compilation(
        False, "not yet measured faster than eager on a GPU (benchmarks/gpu_perf.py's tuneforge-compile side)"
    )


def compile_as_set(model, setting, device: str) -> Compilation:
    """train.compile applied to the loaded model: the choice (choose_compilation), its layers compiled when on."""
    compilation = choose_compilation(setting, device)
    if compilation.enabled:
        compile_layers(model)
    return compilation


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks (LlamaDecoderLayer, Qwen2DecoderLayer, Gemma3DecoderLayer, ...)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model, backend: str = "inductor") -> int:
    """Compile each decoder layer in place; returns how many. Shapes vary with the packed rows' lengths, so
    dimensions are dynamic from the first recompilation on."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
