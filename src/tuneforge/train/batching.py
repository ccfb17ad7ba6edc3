"""Packed rows into training batches, with masks that keep packed examples apart.

Rows come from `data.packing`. Position ids restart at 0 for every example. That is
not enough on its own: with sdpa or eager attention, tokens still attend across
the example boundary (measured: logits moved by up to 0.17 on a tiny Llama). So:

* FlashAttention-2 gets one flat row and position ids only: its varlen kernel
  cuts at every reset, but transformers looks for resets only in a batch of one
  row (`_is_packed_sequence`). A `[B, L]` batch of packed rows would run the
  plain kernel, and examples would attend to each other with no error. So the
  micro-batch's rows are laid end to end in one `[1, sum of lengths]` row.
* torch's own varlen kernel (`train/attention.py`, CUDA sm80+) reads the same flat
  row and boundaries.
* On other CUDA GPUs, and with flex attention, the batch carries position ids and no
  mask at all: transformers finds the resets and builds the mask on the GPU
  ("positions").
* On the CPU, sdpa and eager get a 4-D additive mask, block-diagonal and causal, so
  each token sees only earlier tokens of its own example ("block_mask").

Every batch also says where the head must project: `head_index`, the flat positions
(into `[batch x width]`) whose next token is a target, and `supervised`, their count,
so the training step selects those rows without asking the GPU how many there are.

In every mode the first token of each example is never a target: a packed
example's first label would otherwise be predicted from the example before it.
"""

from __future__ import annotations

from typing import Literal

import torch

IGNORE = -100
# Prompt positions whose next-token loss one micro-batch computes (train.prompt_loss_weight), drawn at random when it
# has more: the mean stays an unbiased estimate, and the [positions, vocab] logits stay bounded (2,048 x Llama-3's 128k
# vocabulary is 1 GB in fp32, where a micro-batch of 8,192 prompt tokens would be 4 GB). A batch of 4 real reviews has
# about 700 (at most 2,200).
PROMPT_LOSS_POSITIONS = 2048


AttentionMode = Literal["block_mask", "flash_varlen", "positions", "padded"]


def attention_mode(kind: str, packing: bool) -> AttentionMode:
    """The collation for a packed-attention kind (train/attention.py) or a model.attention name."""
    if not packing:
        return "padded"
    if kind in ("flash_attention_2", "varlen"):
        return "flash_varlen"
    if kind in ("flex", "flex_attention", "device_mask"):
        return "positions"
    return "block_mask"


class Collator:
    """Pad a list of rows into tensors for the model, with the mask the attention kernel needs."""

    def __init__(
        self,
        pad_id: int,
        mode: AttentionMode,
        mask_dtype: torch.dtype = torch.float32,
        pad_to_multiple_of: int = 8,
        prompt_targets: bool = False,
    ):
        self.pad_id = pad_id
        self.prompt_targets = prompt_targets  # also mark where the next token is prompt text (train.prompt_loss_weight)
        self.mode = mode
        self.mask_dtype = mask_dtype
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.mode == "flash_varlen":
            rows = [_end_to_end(rows)]
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        segments = torch.full((batch, width), -1, dtype=torch.long)  # -1 marks padding
        weighted = any(row.get("weights") for row in rows)
        weights = torch.ones((batch, width), dtype=torch.float32) if weighted else None
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            start = 0
            for s, length in enumerate(row["seq_lens"]):
                position_ids[b, start : start + length] = torch.arange(length)
                segments[b, start : start + length] = s
                labels[b, start] = IGNORE
                if weights is not None and row.get("weights"):
                    weights[b, start : start + length] = row["weights"][s]
                start += length
            if n < width:  # padding is its own segment with fresh positions, never a target
                position_ids[b, n:] = torch.arange(width - n)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if weights is not None:
            out["loss_weights"] = weights
        out["head_index"], out["supervised"] = head_index(labels)
        if self.prompt_targets:  # the next token is the same example's and not a target
            prompt = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] >= 0) & (labels[:, 1:] == IGNORE)
            out["prompt_index"] = _sample(flat_index(prompt), PROMPT_LOSS_POSITIONS)
        if self.mode == "padded":
            out["attention_mask"] = (segments >= 0).long()
        elif self.mode == "block_mask":
            out["attention_mask"] = block_causal_mask(segments, self.mask_dtype)
        elif self.mode == "positions":
            pass  # no mask: transformers builds one on the model's device from the position ids
        else:  # the sequence boundaries, so the kernel need not find them in position_ids with a sync per layer
            starts = (position_ids[0] == 0).nonzero().flatten()
            bounds = torch.cat([starts, torch.tensor([width])]).to(torch.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = bounds
            out["max_length_q"] = out["max_length_k"] = int(bounds.diff().max())
        return out


def flat_index(chosen: torch.Tensor) -> torch.Tensor:
    """[batch, width - 1] marks -> their positions in the flattened [batch x width] hidden states."""
    where = chosen.nonzero()
    return where[:, 0] * (chosen.shape[1] + 1) + where[:, 1]


def head_index(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(flat positions whose next token is a target, how many): where the head projects, in label order."""
    index = flat_index(labels[:, 1:] != IGNORE)
    return index, int(index.numel())


def _sample(index: torch.Tensor, most: int) -> torch.Tensor:
    """At most `most` of the positions, drawn at random (torch's generator), kept in order."""
    if index.numel() <= most:
        return index
    return index[torch.randperm(index.numel())[:most].sort().values]


def _end_to_end(rows: list[dict]) -> dict:
    """The rows of a micro-batch as one row, their examples in order."""
    flat: dict = {"input_ids": [], "labels": [], "seq_lens": []}
    weighted = any(row.get("weights") for row in rows)
    if weighted:
        flat["weights"] = []
    for row in rows:
        flat["input_ids"] += row["input_ids"]
        flat["labels"] += row["labels"]
        flat["seq_lens"] += row["seq_lens"]
        if weighted:
            flat["weights"] += row.get("weights") or [1.0] * len(row["seq_lens"])
    return flat


def mask_dtype(device: str, dtype: str) -> torch.dtype:
    """The dtype of the additive block mask: the compute dtype where CUDA autocasts to it; float32 on CPU, where
    a 4-bit base keeps fp32 hidden states whatever `model.dtype` says (SDPA refuses a bf16 mask beside fp32
    queries) and SDPA and eager attention both accept a float32 mask beside bf16 ones."""
    return getattr(torch, dtype) if device == "cuda" else torch.float32


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: 0 where query i may see key j (same segment, j <= i), else -inf-ish.

    Padding positions see themselves only, so no softmax row is empty (an empty row
    would give NaN, and NaN gradients poison the whole batch even where masked).
    """
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    padding = (segments < 0)[:, :, None] & torch.eye(width, dtype=torch.bool)
    allowed = (same & (segments >= 0)[:, :, None] & causal) | padding
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
