"""What only a CUDA GPU can show: bitsandbytes' CUDA 4-bit kernels and the batcher on the device."""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What does a thermostat do?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
]


@pytest.fixture(scope="module")
def engine(smollm_location):
    from tuneforge.config import ModelSection
    from tuneforge.engine.transformers import Engine
    from tuneforge.models import load_model, load_tokenizer, plan_device

    # float32 compute: in bfloat16 a batch's other shapes change the rounding, and on an H200 one of six greedy
    # answers then drifted after ~10 tokens; this test is about the batcher (padding, masks, positions), not rounding
    section = ModelSection(ref=str(smollm_location), quantization="4bit", dtype="float32")
    plan = plan_device(section)
    assert plan.device == "cuda"
    return Engine(load_model(section, plan, smollm_location), load_tokenizer(section, smollm_location), "base")


def test_batched_greedy_answers_equal_one_at_a_time_on_cuda_4bit(engine):
    from tuneforge.engine.transformers import Settings

    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    settings = Settings(max_new_tokens=24)
    alone = [engine.generate([c], settings, batch_size=1)[0].text for c in chats]
    assert engine.generate(chats, settings, batch_size=len(chats))[0].text == alone[0]
    answers: list = [None] * len(chats)
    start = threading.Barrier(len(chats))

    def ask(i):
        start.wait()
        answers[i] = engine.answer(chats[i], settings).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == alone and all(alone)


def test_flash_attention_packed_batch_logits_equal_each_example_alone(tiny_tokenizer):
    """FlashAttention-2 with micro_batch_size > 1: the collator's flat row keeps examples apart on the real kernel."""
    import torch

    from tests.conftest import make_llama
    from tuneforge.data.packing import build_rows
    from tuneforge.models import flash_attn_problem
    from tuneforge.train.batching import Collator

    problem = flash_attn_problem()
    if problem:
        pytest.skip(f"flash-attn: {problem}")
    model = make_llama(len(tiny_tokenizer)).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    torch.manual_seed(3)
    seqs = [torch.randint(3, model.config.vocab_size, (n,)) for n in (40, 23, 57, 31, 12, 64)]
    rows = build_rows([(x.tolist(), x.tolist()) for x in seqs], capacity=96, packing=True, seed=0)
    assert len(rows) > 1
    batch = Collator(pad_id=2, mode="flash_varlen")([r.__dict__ for r in rows])
    with torch.no_grad():
        inputs = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items() if k != "labels"}
        flat = model(**inputs, use_cache=False).logits[0]
        start = 0
        for row in rows:
            for length in row.seq_lens:
                ids = batch["input_ids"][0, start : start + length].cuda()
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                assert (flat[start : start + length].float() - alone.float()).abs().max() < 0.05
                start += length


def _packed_on_cuda(tiny_tokenizer, mode, attn="sdpa"):
    import torch

    from tests.conftest import make_llama
    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator

    model = make_llama(len(tiny_tokenizer)).to("cuda", torch.bfloat16)
    model.set_attn_implementation(attn)
    torch.manual_seed(3)
    seqs = [torch.randint(3, model.config.vocab_size, (n,)) for n in (40, 23, 57, 31, 12, 64)]
    rows = build_rows([(x.tolist(), x.tolist()) for x in seqs], capacity=96, packing=True, seed=0)
    batch = Collator(pad_id=2, mode=mode)([r.__dict__ for r in rows])
    return model, rows, batch


def _assert_each_alone(model, rows, batch, packed, flat):
    import torch

    start = 0
    for b, row in enumerate(rows):
        start = start if flat else 0
        for length in row.seq_lens:
            ids = batch["input_ids"][0 if flat else b, start : start + length].cuda()
            with torch.no_grad():
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
            got = packed[0 if flat else b, start : start + length]
            assert (got.float() - alone.float()).abs().max() < 0.05
            start += length


def test_torch_varlen_kernel_keeps_packed_examples_apart(tiny_tokenizer):
    """torch's own FlashAttention-2 varlen kernel (no flash-attn package), as the plan picks it on sm80+."""
    import torch

    from tuneforge.train.attention import PackedAttention, use_packed_attention, varlen_available

    if torch.cuda.get_device_capability()[0] < 8 or not varlen_available():
        pytest.skip("the varlen kernel needs sm80+ and torch >= 2.9")
    model, rows, batch = _packed_on_cuda(tiny_tokenizer, "flash_varlen")
    use_packed_attention(model, PackedAttention("varlen", "test"))
    inputs = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items() if k not in ("labels", "head_index")}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    _assert_each_alone(model, rows, batch, packed, flat=True)


def test_positions_only_rows_get_the_mask_built_on_the_gpu(tiny_tokenizer):
    """The T4 layout: several packed rows, position ids and no mask; transformers builds the block mask on the GPU."""
    import torch

    model, rows, batch = _packed_on_cuda(tiny_tokenizer, "positions")
    assert "attention_mask" not in batch and len(rows) > 1
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False
        ).logits
    _assert_each_alone(model, rows, batch, packed, flat=False)


def test_a_varlen_training_step_never_waits_for_the_gpu(tiny_tokenizer, tmp_path):
    """torch.cuda.set_sync_debug_mode("error") raises on any host sync: the loss, its backward and the step's metrics
    run without one when the batch is on the device (as the trainer puts it)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    from tuneforge.train.attention import PackedAttention, use_packed_attention, varlen_available
    from tuneforge.train.trainer import ForgeTrainer

    if torch.cuda.get_device_capability()[0] < 8 or not varlen_available():
        pytest.skip("the varlen kernel needs sm80+ and torch >= 2.9")
    model, rows, batch = _packed_on_cuda(tiny_tokenizer, "flash_varlen")
    model = get_peft_model(model.float(), LoraConfig(r=4, target_modules="all-linear"))
    use_packed_attention(model, PackedAttention("varlen", "test"))
    args = SFTConfig(
        output_dir=str(tmp_path), report_to="none", bf16=True, dataset_kwargs={"skip_prepare_dataset": True}
    )
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]),
        data_collator=lambda x: x,
        processing_class=tiny_tokenizer,
    )
    model.train()
    inputs = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    count = torch.tensor(batch["supervised"], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=count)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
