"""The kernel chosen for packed rows, and that each kernel keeps packed examples apart.

The CUDA varlen kernel itself cannot run on a CPU; its wiring can: the registered attention function gets the
boundaries the collator sends, and with torch's SDPA one example at a time in its place (what the kernel computes),
a packed row's logits and gradients equal each example's alone. tests/gpu runs the kernel itself.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.data.packing import build_rows
from tuneforge.models import DevicePlan
from tuneforge.train import attention
from tuneforge.train.attention import PackedAttention, packed_attention, use_packed_attention
from tuneforge.train.batching import Collator


def plan(device="cuda", dtype="bfloat16", attn="sdpa") -> DevicePlan:
    return DevicePlan(device, dtype, attn, "none", "test device")


@pytest.mark.parametrize(
    "device_plan, capability, varlen, padded_calls, kind",
    [
        (plan("cpu", "float32"), None, True, False, "block_mask"),
        (plan(), (9, 0), True, False, "varlen"),
        (plan(dtype="float16"), (8, 0), True, False, "varlen"),
        (plan(dtype="float16"), (7, 5), True, False, "device_mask"),  # a T4
        (plan(dtype="float32"), (9, 0), True, False, "device_mask"),
        (plan(), (9, 0), True, True, "device_mask"),  # label scoring calls the model on padded batches
        (plan(), (9, 0), False, False, "flex"),  # a torch without the varlen kernel
        (plan(attn="flash_attention_2"), (9, 0), True, False, "flash_attention_2"),
        (plan(attn="flex_attention"), (7, 5), True, False, "flex"),
        (plan(attn="eager"), (9, 0), True, False, "block_mask"),
    ],
)
def test_the_plan_chooses_the_kernel_by_device(monkeypatch, device_plan, capability, varlen, padded_calls, kind):
    monkeypatch.setattr(attention, "_capability", lambda: capability)
    monkeypatch.setattr(attention, "varlen_available", lambda: varlen)
    chosen = packed_attention(device_plan, packing=True, padded_calls=padded_calls)
    assert chosen.kind == kind, chosen.reason
    assert chosen.reason and chosen.describe().startswith(f"attention {kind}: ")
    assert packed_attention(device_plan, packing=False).collation == "padded"


def test_no_kernel_but_block_mask_gets_a_mask_built_on_the_cpu():
    layouts = {kind: PackedAttention(kind, "").collation for kind in attention.COLLATION}
    assert [k for k, mode in layouts.items() if mode == "block_mask"] == ["block_mask"]
    assert layouts["varlen"] == layouts["flash_attention_2"] == "flash_varlen"
    assert layouts["device_mask"] == layouts["flex"] == "positions"


def _packed(model, mode):
    torch.manual_seed(3)
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (n,)).tolist() for n in (9, 6, 11, 5, 7)]
    rows = build_rows([(s, s) for s in seqs], capacity=16, packing=True, seed=0)
    return Collator(pad_id=2, mode=mode)([r.__dict__ for r in rows]), rows


def _alone(model, batch, rows, row_of_flat=False):
    """Each example's logits run alone, laid out as the packed batch has them."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for length in row.seq_lens:
            ids = batch["input_ids"][0 if row_of_flat else b, start : start + length]
            out.append(model(input_ids=ids[None], use_cache=False).logits[0])
            start += length
        if row_of_flat:
            batch = {**batch, "input_ids": batch["input_ids"][:, start:]}
    return out


def test_varlen_kernel_gets_the_boundaries_and_keeps_examples_apart(tiny_llama, monkeypatch):
    model = copy.deepcopy(tiny_llama).float()
    model.set_attn_implementation("sdpa")
    batch, rows = _packed(model, "flash_varlen")
    seen = []
    reference = attention.reference_varlen

    def spy(q, k, v, bounds_q, *rest, **kwargs):
        seen.append(bounds_q.tolist())
        return reference(q, k, v, bounds_q, *rest, **kwargs)

    monkeypatch.setattr(attention, "reference_varlen", spy)
    use_packed_attention(model, PackedAttention("varlen", "test"))
    assert model.config._attn_implementation == attention.VARLEN
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "head_index", "supervised")}
    packed = model(**inputs, use_cache=False).logits[0]
    assert seen and all(b == batch["cu_seq_lens_q"].tolist() for b in seen)
    assert len(seen) == model.config.num_hidden_layers  # every layer, once
    model.set_attn_implementation("sdpa")
    start = 0
    for logits in _alone(model, batch, rows, row_of_flat=True):
        assert torch.allclose(packed[start : start + len(logits)], logits, atol=1e-5)
        start += len(logits)


def test_varlen_gradients_equal_each_example_alone(tiny_llama):
    model = copy.deepcopy(tiny_llama).float()
    model.set_attn_implementation("sdpa")
    batch, rows = _packed(model, "flash_varlen")
    alone = [lg.sum() for lg in _alone(model, batch, rows, row_of_flat=True)]
    torch.stack(alone).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    use_packed_attention(model, PackedAttention("varlen", "test"))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "head_index", "supervised")}
    n = int(batch["cu_seq_lens_q"][-2])  # padding past the last example is not in the sum
    model(**inputs, use_cache=False).logits[0, :n].sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-4), name


def test_the_varlen_function_refuses_a_call_without_boundaries(tiny_llama):
    model = copy.deepcopy(tiny_llama).float()
    use_packed_attention(model, PackedAttention("varlen", "test"))
    with pytest.raises(Exception, match="cu_seq_lens_q"):
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


def test_positions_only_batches_keep_examples_apart_with_a_mask_transformers_builds(tiny_llama):
    """The T4 / flex layout: no attention_mask in the batch, several packed rows; transformers finds the resets in the
    position ids and masks on the model's device."""
    model = copy.deepcopy(tiny_llama).float()
    model.set_attn_implementation("sdpa")
    batch, rows = _packed(model, "positions")
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] > 1
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = iter(_alone(model, batch, rows))
        for b, row in enumerate(rows):
            start = 0
            for length in row.seq_lens:
                assert torch.allclose(packed[b, start : start + length], next(alone), atol=1e-5)
                start += length


def test_flex_attention_is_refused_on_a_cpu_where_it_cannot_train():
    from tuneforge.config import ModelSection
    from tuneforge.errors import TuneforgeError
    from tuneforge.models import plan_device

    with pytest.raises(TuneforgeError, match="model.attention: flex_attention trains on CUDA only"):
        plan_device(ModelSection(attention="flex_attention", device="cpu"))
