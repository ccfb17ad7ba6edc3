"""Does one base under many adapters keep memory flat and throughput up? Shared base vs an engine per adapter.

Eight fine-tuned adapters of the builtin SmolLM2-135M are made with the quickstart's
LoRA settings (r 16, alpha 32, every linear layer; random weights, so each answers
its own way) and served through `Systems`, the layer `serve`, `demo`, `chat` and
`eval` answer through, on the quickstart experiment (CPU, unquantized):

    memory       the process's resident memory (RSS) once 1, and once 8, adapter systems
                 have each answered a question, each count in a fresh process
    throughput   16 concurrent clients, each sending its share of the requests
                 (greedy, max_tokens 16): all on one adapter, then spread over 4;
                 three rounds of each, interleaved, the best of each kept
    answers      every answer of the mixed load against the same system's answer
                 asked alone, one request at a time

Both sides run the same measurements: `before` loads an engine per adapter, each with
its own copy of the base (what every verb did until issue 31), `shared` loads every
adapter onto one base (engine/pool.py). Goals: 8 adapters within 1.1x the memory of
one; the mixed load at least 0.8x the one-adapter throughput.

    python benchmarks/serve_adapters.py
    python benchmarks/serve_adapters.py --requests 32 --rounds 5 --skip-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import QUESTIONS  # noqa: E402  (the same questions, so the two benchmarks' answers compare)


def experiment():
    from tuneforge.config import load_experiment

    return load_experiment(REPO / "configs" / "quickstart.yaml", ["model.quantization=none", "model.device=cpu"])


def make_adapters(folder: Path, count: int) -> list[Path]:
    """`count` adapters with the quickstart's LoRA settings and random, small updates, saved as training saves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.models import load_model, load_tokenizer, materialize, resolve

    section = experiment().model
    location = materialize(resolve(section.ref))
    tokenizer = load_tokenizer(section, location)
    lora = experiment().lora
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
        )
        model = get_peft_model(load_model(section, location=location), config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)  # small: each adapter answers differently, in words
        target = folder / f"adapter{i}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "chat_template.jinja").write_text(tokenizer.chat_template)
        folders.append(target)
    return folders


def systems(mode: str):
    """The Systems of a fresh process: `shared` (one base, the pool) or `before` (an engine per adapter)."""
    from tuneforge.run import RunDir
    from tuneforge.systems import Systems

    exp = experiment()
    found = Systems(exp, RunDir(exp, Path(tempfile.mkdtemp()) / "run"), system_prompt="")
    if mode == "before":
        from tuneforge.engine.transformers import Engine

        found._transformers_engine = lambda model: Engine.load(exp, model, found.run)
    return found


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child_memory(mode: str, adapters: list[str]) -> dict:
    from tuneforge.engine.generation import Settings

    found = systems(mode)
    for folder in adapters:
        found.get(f"adapter:{folder}").generate([[{"role": "user", "content": QUESTIONS[0]}]], Settings(8))
    return {"rss_mib": rss_mib()}


def load(found, names: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads share `requests` requests, client i asking as names[i % len(names)]."""
    from tuneforge.engine.generation import Settings

    cursor, lock, answers = iter(range(requests)), threading.Lock(), {}

    def client(i: int) -> None:
        system = found.get(names[i % len(names)])
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            chat = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
            answers[index] = (system.name, chat, system.generate([chat], Settings(max_tokens))[0].text)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": requests / (time.perf_counter() - started), "answers": [answers[i] for i in range(requests)]}


def child_throughput(mode: str, adapters: list[str], clients: int, requests: int, max_tokens: int, rounds: int) -> dict:
    from tuneforge.engine.generation import Settings

    found = systems(mode)
    one = [f"adapter:{adapters[0]}"]
    mixed = [f"adapter:{a}" for a in adapters[:4]]
    for names in (one, mixed):  # untimed: every system loaded, and the CPU kernels meet each batch shape once
        load(found, names, clients, requests, max_tokens)
    single, spread = [], []
    for _ in range(rounds):  # interleaved, so a busy spell of a shared machine falls on both sides
        single.append(load(found, one, clients, requests, max_tokens))
        spread.append(load(found, mixed, clients, requests, max_tokens))
    alone = {}
    answered = [a for r in spread for a in r["answers"]]
    for name, chat, _ in answered:
        key = (name, chat[0]["content"])
        if key not in alone:
            alone[key] = found.get(name).generate([chat], Settings(max_tokens))[0].text
    return {
        "single_rps": max(r["rps"] for r in single),
        "mixed_rps": max(r["rps"] for r in spread),
        "single_all": [round(r["rps"], 3) for r in single],
        "mixed_all": [round(r["rps"], 3) for r in spread],
        "same": sum(text == alone[(name, chat[0]["content"])] for name, chat, text in answered),
        "asked": len(answered),
        "distinct": len({text for _, _, text in answered}),
    }


def run_child(options: argparse.Namespace, *args: str) -> dict:
    """One measurement in a fresh process, with this run's load options."""
    load = ["--clients", str(options.clients), "--requests", str(options.requests)]
    load += ["--rounds", str(options.rounds), "--max-tokens", str(options.max_tokens)]
    out = subprocess.run(
        [sys.executable, __file__, *load, "--child", *args], capture_output=True, text=True, env=os.environ.copy()
    )
    if out.returncode != 0:
        sys.exit(f"child {' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="requests per timed load")
    parser.add_argument("--rounds", type=int, default=3, help="timed loads per side, interleaved; the best is kept")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--skip-before", action="store_true", help="measure the shared base only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, *adapters = args.child
        if kind == "memory":
            result = child_memory(mode, adapters)
        else:
            result = child_throughput(mode, adapters, args.clients, args.requests, args.max_tokens, args.rounds)
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="tuneforge-adapters-bench-"))
    adapters = [str(a) for a in make_adapters(workdir, 8)]
    modes = ("shared",) if args.skip_before else ("before", "shared")
    memory = {(m, n): run_child(args, "memory", m, *adapters[:n])["rss_mib"] for m in modes for n in (1, 8)}
    speed = {m: run_child(args, "throughput", m, *adapters[:4]) for m in modes}
    report(memory, speed, modes, args)


def report(memory: dict, speed: dict, modes: tuple, args) -> None:
    print(f"\nbuiltin SmolLM2-135M, fp32 on CPU ({os.cpu_count()} CPU threads), adapters r 16 on every linear layer")
    print(f"{'':<34}" + "".join(f"{m:>24}" for m in modes))
    print(f"{'RSS with 1 adapter (MiB)':<34}" + "".join(f"{memory[(m, 1)]:>24,.0f}" for m in modes))
    print(f"{'RSS with 8 adapters (MiB)':<34}" + "".join(f"{memory[(m, 8)]:>24,.0f}" for m in modes))
    print(f"{'  8 / 1 (goal <= 1.10x)':<34}" + "".join(f"{memory[(m, 8)] / memory[(m, 1)]:>23.2f}x" for m in modes))
    label = f"{args.clients} clients, {args.requests} requests, max_tokens {args.max_tokens}, best of {args.rounds}"
    print(f"{label:<34}")
    print(f"{'  on one adapter (req/s)':<34}" + "".join(f"{speed[m]['single_rps']:>24.2f}" for m in modes))
    print(f"{'  spread over 4 adapters (req/s)':<34}" + "".join(f"{speed[m]['mixed_rps']:>24.2f}" for m in modes))
    ratios = "".join(f"{speed[m]['mixed_rps'] / speed[m]['single_rps']:>23.2f}x" for m in modes)
    print(f"{'  4 / 1 (goal >= 0.80x)':<34}" + ratios)
    for m in modes:
        print(f"  {m}: every round, one adapter {speed[m]['single_all']}, four {speed[m]['mixed_all']} req/s")
    same = "".join(f"{speed[m]['same']:>17}/{speed[m]['asked']} same" for m in modes)
    print(f"{'  mixed answers = one at a time':<34}" + same)
    print(f"{'  distinct answers in the mixed load':<34}" + "".join(f"{speed[m]['distinct']:>24}" for m in modes))
    if "before" in modes:
        print(
            f"\nshared against before: memory with 8 adapters {memory[('shared', 8)] / memory[('before', 8)]:.2f}x, "
            f"mixed throughput {speed['shared']['mixed_rps'] / speed['before']['mixed_rps']:.2f}x"
        )
    if any(speed[m]["same"] != speed[m]["asked"] for m in modes):
        sys.exit(1)


if __name__ == "__main__":
    main()
