"""Packing: rows respect capacity, and a packed example's logits equal its logits alone."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.packing import build_rows, pack
from tuneforge.train.batching import IGNORE, Collator, block_causal_mask


def test_pack_fills_rows_and_uses_every_example_once():
    lengths = [50, 400, 120, 300, 90, 60, 512, 10, 200, 33]
    rows = pack(lengths, 512, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) == 4  # 1775 tokens need at least 4 rows of 512
    assert pack(lengths, 512, seed=0) == rows


def test_collator_positions_labels_and_padding():
    examples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])]
    rows = build_rows(examples, capacity=6, packing=True, seed=0)
    batch = Collator(pad_id=0, mode="block_mask", pad_to_multiple_of=8)([r.__dict__ for r in rows])
    assert batch["input_ids"].shape == (2, 8)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        assert batch["labels"][b, n:].eq(IGNORE).all()
        expected = torch.cat([torch.arange(k) for k in row.seq_lens])
        assert torch.equal(batch["position_ids"][b, :n], expected)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8)
    assert torch.isfinite(torch.softmax(mask, -1)).all()  # no empty row, even for padding


def test_block_mask_is_causal_and_block_diagonal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = block_causal_mask(segments, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_logits_alone(tiny_llama, attention):
    tiny_llama.set_attn_implementation(attention)
    torch.manual_seed(1)
    a, b, c = (torch.randint(3, 390, (n,)) for n in (9, 6, 11))
    rows = build_rows([(x.tolist(), x.tolist()) for x in (a, b, c)], capacity=16, packing=True, seed=0)
    batch = Collator(pad_id=2, mode="block_mask")([r.__dict__ for r in rows])
    with torch.no_grad():
        packed = tiny_llama(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        naive = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for r, row in enumerate(rows):
            start = 0
            for length in row.seq_lens:
                ids = batch["input_ids"][r, start : start + length]
                alone = tiny_llama(input_ids=ids[None]).logits[0]
                assert torch.allclose(packed[r, start : start + length], alone, atol=1e-5)
                if start > 0:  # without the mask the later example sees the earlier one: the trap
                    assert not torch.allclose(naive[r, start : start + length], alone, atol=1e-3)
                start += length
    tiny_llama.set_attn_implementation("sdpa")


def test_flash_varlen_batch_is_one_row_that_flash_attention_reads_as_packed():
    """transformers runs FlashAttention-2's varlen kernel only for a batch of one row whose positions reset;
    a [B, L] batch of packed rows would silently let examples attend to each other."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [6, 7, 8, 9]), ([10, 11, 12], [10, 11, 12])]
    rows = build_rows(examples, capacity=7, packing=True, seed=0, weights=[1.0, 2.0, 3.0, 4.0])
    assert len(rows) == 2
    batch = Collator(pad_id=0, mode="flash_varlen")([r.__dict__ for r in rows])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 16)  # 12 tokens end to end, padded to a multiple of 8
    assert _is_packed_sequence(batch["position_ids"], batch_size=batch["input_ids"].shape[0])
    lengths = [n for row in rows for n in row.seq_lens]
    expected_ids = [t for row in rows for t in row.input_ids]
    assert batch["input_ids"][0, :12].tolist() == expected_ids
    assert batch["position_ids"][0, :12].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)  # never predicted from the example before
    assert batch["labels"][0, 12:].eq(IGNORE).all()
    example_weights = [w for row in rows for w in row.weights]
    assert [batch["loss_weights"][0, s].item() for s in starts] == example_weights
    assert batch["cu_seq_lens_q"].tolist() == starts + [12, 16]  # padding is a sequence of its own
    assert batch["max_length_q"] == max(lengths)


def test_flat_row_logits_equal_logits_alone(tiny_llama):
    """The flat row's contract holds on CPU too: transformers' sdpa path reads the same position resets."""
    torch.manual_seed(2)
    seqs = [torch.randint(3, tiny_llama.config.vocab_size, (n,)) for n in (9, 6, 11, 5)]
    rows = build_rows([(x.tolist(), x.tolist()) for x in seqs], capacity=16, packing=True, seed=0)
    batch = Collator(pad_id=2, mode="flash_varlen")([r.__dict__ for r in rows])
    with torch.no_grad():
        flat = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            for length in row.seq_lens:
                ids = batch["input_ids"][0, start : start + length]
                assert torch.allclose(
                    flat[start : start + length], tiny_llama(input_ids=ids[None]).logits[0], atol=1e-5
                )
                start += length


def test_packed_mask_fits_fp32_queries_when_the_cpu_plan_says_bfloat16(tiny_llama):
    """model.dtype bfloat16 on CPU with a 4-bit base: hidden states stay fp32 (no autocast there), and SDPA
    refused the bf16 block mask beside them, so training crashed at the first packed step."""
    from tuneforge.train.batching import mask_dtype

    rows = build_rows([([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [IGNORE, 9])], capacity=8, packing=True, seed=0)
    model = tiny_llama.float()
    model.set_attn_implementation("sdpa")
    batch = Collator(pad_id=2, mode="block_mask", mask_dtype=mask_dtype("cpu", "bfloat16"))([r.__dict__ for r in rows])
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "labels"}).logits).all()
    assert mask_dtype("cuda", "bfloat16") == torch.bfloat16 and mask_dtype("cuda", "float16") == torch.float16
