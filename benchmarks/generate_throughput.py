"""Generation throughput: 64 prompts of mixed length, one at a time vs batched.

  baseline   plain HF `generate`, one prompt at a time (what a notebook loop does)
  tuneforge  `Engine.generate` as `tuneforge generate` runs it: left-padded
             batches of prompts grouped by length

Same model, prompts and greedy decoding on both sides. Prints generated tokens/s
for each, their ratio, and how many greedy answers agree exactly.

    python benchmarks/generate_throughput.py [--prompts 64] [--max-new-tokens 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prompts(n: int, seed: int) -> list[list[dict]]:
    """Short support questions, mid-length review classifications, long KB-grounded questions."""
    rng = random.Random(seed)
    data = REPO / "examples" / "data" / "support"
    chats = [json.loads(line)["messages"] for line in (data / "conversations.jsonl").read_text().splitlines()]
    pages = sorted((data / "kb").glob("*.md"))
    out = []
    for i in range(n):
        chat = rng.choice(chats)
        kind = i % 3
        if kind == 0:
            out.append(chat[:2])
        elif kind == 1:
            out.append(
                [
                    chat[0],
                    {
                        "role": "user",
                        "content": f"Context:\n{rng.choice(pages).read_text()[:1500]}\n\n{chat[1]['content']}",
                    },
                ]
            )
        else:
            out.append([{"role": "user", "content": f"{chat[1]['content']} Please explain in detail, step by step."}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--quantization", choices=["none", "4bit", "8bit"], help="override the config's model.quantization"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch

    from tuneforge.config import load_experiment
    from tuneforge.engine.transformers import Engine, Settings

    experiment = load_experiment(args.config, [f"model.quantization={args.quantization}"] if args.quantization else [])
    engine = Engine.load(experiment, "base")
    chats = prompts(args.prompts, args.seed)
    settings = Settings(max_new_tokens=args.max_new_tokens)
    engine.generate(chats[:2], settings)  # warm-up: first-call kernel setup is not throughput

    started = time.perf_counter()
    single_texts, single_tokens = [], 0
    for chat in chats:
        ids = torch.tensor([engine.prompt_ids(chat)], device=engine.device)
        with torch.no_grad():
            out = engine.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **engine._generate_kwargs(settings)
            )
        answer = engine._answer(out[0, ids.shape[1] :].tolist(), ids.shape[1], settings)
        single_texts.append(answer.text)
        single_tokens += answer.completion_tokens
    single_s = time.perf_counter() - started

    started = time.perf_counter()
    batched = engine.generate(chats, settings, batch_size=args.batch_size)
    batched_s = time.perf_counter() - started
    batched_tokens = sum(a.completion_tokens for a in batched)

    agree = sum(a.text == b for a, b in zip(batched, single_texts))
    lengths = sorted(len(engine.prompt_ids(c)) for c in chats)
    print(
        f"model {experiment.model.ref} ({experiment.model.quantization}) on {engine.device}; {len(chats)} prompts, "
        f"prompt tokens min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]}, greedy, "
        f"{args.max_new_tokens} new tokens max"
    )
    print(f"\n{'':<12}{'seconds':>9}{'new tokens':>12}{'tokens/s':>10}")
    print(f"{'one-by-one':<12}{single_s:>9.1f}{single_tokens:>12}{single_tokens / single_s:>10.1f}")
    print(f"{'batched':<12}{batched_s:>9.1f}{batched_tokens:>12}{batched_tokens / batched_s:>10.1f}")
    print(f"\ngreedy answers identical: {agree}/{len(chats)}")
    print(f"speedup: {(batched_tokens / batched_s) / (single_tokens / single_s):.2f}")


if __name__ == "__main__":
    main()
