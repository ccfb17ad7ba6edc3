"""Which kernel keeps packed examples apart on this machine, and torch's own varlen FlashAttention-2 as an attention
function transformers can call.

A packed row holds several examples, and each token must attend only to earlier tokens of its own example. The
kinds, best first:

* `flash_attention_2`: the flash-attn package is installed; its varlen kernel reads one flat row and the boundaries.
* `varlen`: CUDA sm80+ without flash-attn: torch ships the same FlashAttention-2 varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, with autograd). Registered here as `tuneforge_varlen`; the collator lays
  a micro-batch end to end in one row and sends the boundaries (`cu_seq_lens_q`), so no mask exists at all and no
  masked-out block is computed.
* `flex`: sm80+ where torch has no varlen kernel, or `model.attention: flex_attention`: transformers builds a
  document block mask from the position ids on the GPU, and the compiled kernel skips the blocks it masks out.
* `device_mask`: other CUDA GPUs (a T4) and fp32 on CUDA: SDPA with the block-diagonal mask that transformers builds
  on the GPU from the position ids. Never built on the CPU.
* `block_mask`: CPU (and `model.attention: eager`): the collator's block-diagonal additive mask, on the device that
  computes anyway (measured and kept: see batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.models import DevicePlan
    from tuneforge.train.batching import AttentionMode

VARLEN = "tuneforge_varlen"  # the name the varlen kernel is registered under in transformers' AttentionInterface

Kind = Literal["padded", "flash_attention_2", "varlen", "flex", "device_mask", "block_mask"]
COLLATION: dict[str, AttentionMode] = {
    "padded": "padded",
    "flash_attention_2": "flash_varlen",
    "varlen": "flash_varlen",
    "flex": "positions",
    "device_mask": "positions",
    "block_mask": "block_mask",
}


@dataclass(frozen=True)
class PackedAttention:
    """The kernel the training plan chose for packed rows, and why (printed with the plan, kept in the summary)."""

    kind: Kind
    reason: str

    @property
    def collation(self) -> AttentionMode:
        """How the collator lays out a micro-batch for this kernel."""
        return COLLATION[self.kind]

    def describe(self) -> str:
        return f"attention {self.kind}: {self.reason}"


def varlen_available() -> bool:
    """torch's built-in FlashAttention-2 varlen kernel exists in this torch (2.9 and later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_attention(plan: DevicePlan, packing: bool, padded_calls: bool = False) -> PackedAttention:
    """Choose the kernel for packed rows from the device plan. `padded_calls`: the same model is also called on padded
    batches during training (label scoring), which the varlen kernel cannot read, so it is not chosen then."""
    if not packing:
        return PackedAttention("padded", "packing is off: one example per row, padded, with a padding mask")
    if plan.attention == "flash_attention_2":
        return PackedAttention("flash_attention_2", "flash-attn is installed: its varlen kernel over one flat row")
    if plan.attention == "flex_attention":
        return PackedAttention("flex", "model.attention: flex_attention, set in the file (a document block mask)")
    if plan.attention == "eager":
        return PackedAttention("block_mask", "model.attention: eager, set in the file: a dense block-diagonal mask")
    if plan.device != "cuda":
        return PackedAttention(
            "block_mask", "CPU: SDPA with the block-diagonal mask (the varlen kernel and flex's backward need CUDA)"
        )
    major = _capability()[0]
    on_device = "SDPA with the block-diagonal mask built on the GPU from the position ids"
    if major < 8 or plan.dtype == "float32":
        why = f"sm_{major}x has no FlashAttention-2" if major < 8 else "FlashAttention-2 needs bf16 or fp16"
        return PackedAttention("device_mask", f"{why}: {on_device}")
    if padded_calls:
        return PackedAttention("device_mask", f"label scoring calls the model on padded batches too: {on_device}")
    if varlen_available():
        return PackedAttention(
            "varlen", "torch's built-in FlashAttention-2 varlen kernel over one flat row: no mask, no masked-out work"
        )
    return PackedAttention("flex", "this torch has no varlen kernel: flex attention with a document block mask")


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def use_packed_attention(model, choice: PackedAttention) -> None:
    """Point the model's attention at the chosen kernel (only `varlen` differs from how the model was loaded)."""
    if choice.kind != "varlen":
        return
    from transformers import AttentionInterface

    from tuneforge.train.wrapped import causal_lm

    inner = causal_lm(model)
    if getattr(inner.config, "attn_logit_softcapping", None):
        raise TuneforgeError(
            "model.attention: this model soft-caps its attention logits, which the varlen kernel cannot; "
            "set model.attention: eager"
        )
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    inner.set_attn_implementation(VARLEN)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over one flat row of packed examples.

    query/key/value arrive as [1, heads, tokens, dim]; the boundaries as `cu_seq_lens_q` / `cu_seq_lens_k`
    (int32, [examples + 1]) with `max_length_q` / `max_length_k`, as the collator sends them. Returns
    [1, tokens, heads, dim]."""
    bounds_q = kwargs.get("cu_seq_lens_q")
    if bounds_q is None:
        raise TuneforgeError(
            f"attention {VARLEN} needs the packed row's example boundaries (cu_seq_lens_q); "
            "it serves tuneforge's packed training batches only"
        )
    if dropout and module.training:
        raise TuneforgeError(f"attention {VARLEN} has no attention dropout; the model asks for {dropout}")
    bounds_k = kwargs.get("cu_seq_lens_k", bounds_q)
    longest_q = kwargs.get("max_length_q")
    longest_k = kwargs.get("max_length_k", longest_q)
    batch, heads, tokens, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * tokens, heads, dim)
    k = key.transpose(1, 2).reshape(batch * key.shape[2], key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * value.shape[2], value.shape[1], dim)
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # causal, and local where the layer is
    kernel = _cuda_varlen if q.is_cuda else reference_varlen
    out = kernel(q, k, v, bounds_q, bounds_k, longest_q, longest_k, scale=scaling, window=window)
    return out.reshape(batch, tokens, heads, dim), None


def _cuda_varlen(q, k, v, bounds_q, bounds_k, longest_q, longest_k, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        q,
        k,
        v,
        bounds_q.to(device=q.device, dtype=torch.int32),
        bounds_k.to(device=q.device, dtype=torch.int32),
        int(longest_q),
        int(longest_k),
        scale=scale,
        window_size=window,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def reference_varlen(q, k, v, bounds_q, bounds_k, longest_q, longest_k, scale, window):
    """What the varlen kernel computes, one example at a time with SDPA: the CPU stand-in that lets the wiring be
    tested where the CUDA kernel cannot run ([tokens, heads, dim] in and out)."""
    import torch.nn.functional as F

    out = torch.empty_like(q)
    starts = bounds_q.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        length = end - start
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, length, dim]
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if window[0] >= 0:
            allowed &= ~torch.ones_like(allowed).tril(-window[0] - 1)
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=allowed, scale=scale, enable_gqa=qs.shape[0] != ks.shape[0]
        ).transpose(0, 1)
    return out
