"""Training throughput: tuneforge's trainer against plain HF Trainer + PEFT and against TRL's own best setups.

Every side trains the same model (builtin SmolLM2, 4-bit NF4, LoRA r16 on all linear
layers) on the same mixed-length chat data, with the same supervised tokens, for the
same number of optimizer steps, from the same seed, with about the same examples per
step:

  baseline     transformers Trainer + PEFT, one example per row, padded to the longest
               in the batch, the model's own loss (full logits)
  trl-packing  TRL's SFTTrainer, best-fit-decreasing packing (`packing=True`, "bfd"),
               which runs padding-free: one flat row, position ids, the model's loss
  trl-padfree  TRL's SFTTrainer, `padding_free=True` without packing: each batch's
               examples end to end in one row
  tuneforge    ForgeTrainer: examples packed into rows (block-diagonal mask, or one
               flat row on FlashAttention-2), logits only at supervised positions

Each side runs in its own process (peak memory is per process). All are then
scored by the same function: token-weighted loss on the same held-out examples.

    python benchmarks/train_throughput.py [--steps 8] [--warmup 2] [--batch 8] [--sides baseline,trl-packing,tuneforge]

Each side runs `--warmup` steps first and times the `--steps` after them between
synchronised timestamps; tokens are counted where batches are trained (benchmarks/_timing.py,
shared with gpu_perf.py). Prints supervised tokens/s, padding share and peak memory per
side, then the speedup of tuneforge against each other side (`speedup vs baseline: X.XX`,
`speedup vs trl-packing: ...`). On CUDA it also prints MFU on 4·N FLOPs per token (LoRA:
forward plus input gradients) and on 6·N, N the matmul parameters with lm_head, and the
peak of the exact device.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import StepTimer, count_trained_tokens, matmul_params, tag_token_counts, throughput  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUPPORT_SYSTEM = (
    "You are Kestrel Home's support assistant for the Kestrel K2 thermostat. Answer briefly and accurately."
)


def mixed_examples(seed: int) -> list[list[dict]]:
    """Short support chats, mid-length review classifications and long KB-grounded answers."""
    rng = random.Random(seed)
    data = REPO / "examples" / "data"
    chats = [
        json.loads(line)["messages"] for line in (data / "support" / "conversations.jsonl").read_text().splitlines()
    ]
    import csv

    with open(data / "reviews" / "reviews.csv", newline="", encoding="utf-8") as fh:
        reviews = [r for r in csv.DictReader(fh) if r["review"].strip() and r["sentiment"]]
    classify = [
        [
            {"role": "system", "content": "Classify the sentiment of the review: positive or negative."},
            {"role": "user", "content": r["review"].strip()},
            {"role": "assistant", "content": r["sentiment"]},
        ]
        for r in reviews[:150]
    ]
    pages = sorted((data / "support" / "kb").glob("*.md"))
    grounded = []
    for chat in chats[:80]:
        page = rng.choice(pages).read_text()
        grounded.append(
            [
                {"role": "system", "content": SUPPORT_SYSTEM},
                {"role": "user", "content": f"Context:\n{page}\n\nQuestion: {chat[1]['content']}"},
                chat[2],
            ]
        )
    examples = chats + classify + grounded
    rng.shuffle(examples)
    return examples


def tokenized(tokenizer, examples, max_length):
    from tuneforge.data.chat import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    out = []
    for messages, sequences in zip(examples, encoder.encode_examples(examples)):
        if any(len(e.input_ids) > max_length for e in sequences):
            _, sequences = encoder.fit(messages, max_length, "truncate")
        out += [(e.input_ids, e.labels()) for e in sequences]
    return out


SIDES = ("baseline", "trl-packing", "trl-padfree", "tuneforge")
LLAMA_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)


def load(args):
    import torch

    from tuneforge.config import ModelSection
    from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve

    if args.model == "random:llama-3.1-8b":
        return random_llama_8b(args)
    section = ModelSection(ref=args.model, quantization=args.quantization)
    plan = plan_device(section)
    location = materialize(resolve(section.ref))
    tokenizer = load_tokenizer(section, location)
    torch.manual_seed(args.seed)
    model = load_model(section, plan, location)
    model.config.use_cache = False
    return plan, tokenizer, model


def random_llama_8b(args):
    """A randomly initialised Llama-3.1-8B-shaped model in bf16 on the GPU (MFU needs the shape, not the weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.config import ModelSection
    from tuneforge.models import load_tokenizer, plan_device

    if not torch.cuda.is_available():
        raise SystemExit("random:llama-3.1-8b needs a CUDA GPU with about 40 GB free (bf16 weights, LoRA, activations)")
    plan = plan_device(ModelSection(quantization="none", device="cuda"))
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B_SHAPE, attn_implementation=plan.attention))
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    tokenizer = load_tokenizer(ModelSection())  # SmolLM2's ids (< 49,152) are valid in the larger vocabulary
    return plan, tokenizer, model


def add_lora(model, plan):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if plan.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def pad_to_longest(pad_id: int):
    """The baseline's collator: one example per row, padded to the longest in the micro-batch."""
    import torch

    from tuneforge.train.batching import IGNORE

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id)
        labels = torch.full((len(features), width), IGNORE)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def side_trainer(args, plan, tokenizer, model, train, common: dict):
    """The side's trainer, its collator tagged so the trained batches' real tokens can be counted."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator, attention_mode, mask_dtype
    from tuneforge.train.trainer import ForgeTrainer

    rows = [{"input_ids": ids, "labels": labels} for ids, labels in train]
    mean_len = sum(len(ids) for ids, _ in train) / len(train)
    if args.child == "baseline":
        trainer = Trainer(
            model=model,
            args=TrainingArguments(per_device_train_batch_size=args.batch, **common),
            train_dataset=Dataset.from_list(rows),
            data_collator=pad_to_longest(tokenizer.pad_token_id),
        )
    elif args.child.startswith("trl-"):
        from trl import SFTTrainer

        if args.child == "trl-packing":  # rows of about `batch` examples, one row per step, as tuneforge's
            mode = dict(
                packing=True,
                packing_strategy="bfd",
                max_length=max(args.max_length, int(args.batch * mean_len)),
                per_device_train_batch_size=1,
            )
        else:  # already cut to --max-length
            mode = dict(padding_free=True, max_length=None, per_device_train_batch_size=args.batch)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**mode, **common),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    else:
        capacity = max(args.max_length, int(args.batch * mean_len))  # one packed row holds about `batch` examples
        packed = build_rows(train, capacity, packing=True, seed=args.seed)
        rows = [{"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens} for r in packed]
        collate = Collator(
            tokenizer.pad_token_id, attention_mode(plan.attention, True), mask_dtype(plan.device, plan.dtype)
        )
        config = SFTConfig(
            per_device_train_batch_size=1, dataset_kwargs={"skip_prepare_dataset": True}, packing=False, **common
        )
        trainer = ForgeTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            data_collator=collate,
            processing_class=tokenizer,
        )
    trainer.data_collator = tag_token_counts(trainer.data_collator)
    return trainer


def child(args) -> dict:
    """One side: `--warmup` steps, then `--steps` timed ones whose trained batches are counted; the held-out loss."""
    import torch

    plan, tokenizer, model = load(args)
    examples = tokenized(tokenizer, mixed_examples(args.seed), args.max_length)
    held_out, train = examples[: args.eval_examples], examples[args.eval_examples :]
    model = add_lora(model, plan)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.warmup + args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=plan.device == "cpu",
        bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    trainer = side_trainer(args, plan, tokenizer, model, train, common)
    timer = StepTimer(args.warmup, args.steps)
    counts = count_trained_tokens(trainer, timer)
    trainer.add_callback(timer)
    trainer.train()
    cuda = plan.device == "cuda"
    result = throughput(timer, counts, matmul_params(model), torch.cuda.get_device_name() if cuda else None)
    result.update(
        seconds=result["measured_s"],
        eval_loss=held_out_loss(trainer.model, held_out, plan),
        peak_mb=(torch.cuda.max_memory_allocated() / 2**20)
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=plan.describe(),
    )
    return result


def held_out_loss(model, examples, plan) -> float:
    """Token-weighted cross-entropy on supervised tokens, one example at a time: the same judge for both sides."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
            target = torch.tensor(labels[1:], device=device)
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="a model reference, or random:llama-3.1-8b (CUDA only) for MFU at 8B scale",
    )
    parser.add_argument("--quantization", default="4bit", choices=["none", "4bit", "8bit"])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps run first and left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step (the baseline's batch)")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--child", choices=SIDES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or "tuneforge" not in sides:
        raise SystemExit(f"--sides: {', '.join(unknown) or 'tuneforge is missing'}; choose from {', '.join(SIDES)}")
    results = {}
    for side in sides:
        cmd = [sys.executable, __file__, "--child", side] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ours = results["tuneforge"]
    print(
        f"model {args.model} ({args.quantization}) on {ours['device']}; "
        f"{args.steps} timed steps after {args.warmup} warm-up, ~{args.batch} examples per step"
    )
    print(
        f"\n{'':<13}{'supervised tok/s':>18}{'all tok/s':>11}{'padding':>9}"
        f"{'peak MB':>10}{'eval loss':>11}{'seconds':>9}"
    )
    for side, r in results.items():
        print(
            f"{side:<13}{r['supervised_tokens_per_s']:>18.1f}{r['tokens_per_s']:>11.1f}{r['padding_share']:>9.1%}"
            f"{r['peak_mb']:>10,.0f}{r['eval_loss']:>11.4f}{r['seconds']:>9.1f}"
        )
        if r.get("mfu_4n") is not None:
            print(
                f"{'':<13}MFU {r['mfu_4n']:.1%} on 4·N, {r['mfu_6n']:.1%} on 6·N (N = {r['matmul_params'] / 1e6:.0f}M "
                f"matmul params; {r['device_name']} at {r['peak_tflops']:.0f} TFLOPs)"
            )
        elif r.get("device_name"):
            print(f"{'':<13}no MFU: no known peak for {r['device_name']!r}")
    print()
    for side, other in results.items():
        if side != "tuneforge":
            print(
                f"vs {side}: peak memory ratio {ours['peak_mb'] / other['peak_mb']:.2f}, "
                f"eval loss {(ours['eval_loss'] - other['eval_loss']) / other['eval_loss']:+.2%}"
            )
            print(f"speedup vs {side}: {ours['supervised_tokens_per_s'] / other['supervised_tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
