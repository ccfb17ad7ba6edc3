"""Does `tuneforge serve` share the model between concurrent users? Batched vs one at a time.

Starts the real server twice on the quickstart experiment (the builtin model,
`base`, 4-bit): once with dynamic batching (`--max-batch 16`, the default) and once
with `--max-batch 1` (one request at a time, the baseline). For 1, 4 and 16
concurrent clients, each client sends its share of the same request list with the
official `openai` client (greedy, max_tokens 16 by default), and the script prints
requests per second, p50 and p95 latency per setting, the throughput ratio
batched / one at a time, and whether every greedy answer is identical in both.
Each server first runs every level once untimed (the model loads, and the CPU
kernels meet each batch shape once), so both sides are timed warm.

    python benchmarks/serve_throughput.py
    python benchmarks/serve_throughput.py --requests 32 --max-tokens 32 --clients 1 8 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What does a thermostat do?",
    "Give me a synonym for happy.",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "What language is spoken in Brazil?",
    "How do I boil an egg?",
    "What is the opposite of cold?",
    "Name a fruit that is yellow.",
    "What is the freezing point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean?",
    "How many days are in a week?",
    "What gas do plants take in?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(max_batch: int, workdir: Path, env: dict | None = None, api_key: str = "unused"):
    """The real server on the quickstart experiment, until the official client gets its model list; yields that
    client (with the server's pid as `client.server_pid`)."""
    import openai

    port = free_port()
    log = open(workdir / f"serve-batch{max_batch}.log", "w")
    # the 4-bit base the README's serve figures were measured with (the quickstart itself now leaves CPU unquantized)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "serve",
            str(REPO / "configs" / "quickstart.yaml"),
            "model.quantization=4bit",
            "--port",
            str(port),
            "--run-dir",
            str(workdir / "run"),
            "--max-batch",
            str(max_batch),
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env or os.environ.copy(),
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=600)
    client.server_pid = proc.pid
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                sys.exit(f"serve exited with {proc.returncode}; see {log.name}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    sys.exit("serve did not come up in 10 minutes")
                time.sleep(0.5)
        yield client
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def ask(client, question: str, max_tokens: int) -> tuple[str, float]:
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content, time.perf_counter() - started


def load(client, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads share `requests` requests, each sending its next one when the last is answered."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    answers: dict[int, str] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(range(requests))

    def worker():
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            text, seconds = ask(client, questions[index], max_tokens)
            with lock:
                answers[index] = text
                latencies.append(seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": requests / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "wall": wall,
        "answers": [answers[i] for i in range(requests)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tuneforge-serve-bench-"))
    results: dict[tuple[str, int], dict] = {}
    for mode, max_batch in (("one at a time", 1), ("batched", args.max_batch)):
        with server(max_batch, workdir) as client:
            for clients in args.clients:  # untimed: load the model and let the CPU kernels meet every shape once
                load(client, clients, args.requests, args.max_tokens)
            for clients in args.clients:
                results[(mode, clients)] = r = load(client, clients, args.requests, args.max_tokens)
                print(
                    f"{mode:<13} {clients:>3} clients: {r['rps']:.2f} req/s, "
                    f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s",
                    flush=True,
                )

    print(
        f"\n{args.requests} requests per level, max_tokens {args.max_tokens}, greedy, "
        f"{os.cpu_count()} CPU threads, builtin model (base)"
    )
    print(
        f"{'clients':>7}  {'one at a time':>22}  {'batched':>22}  {'throughput ratio':>16}  {'identical answers':>17}"
    )
    for clients in args.clients:
        one, many = results[("one at a time", clients)], results[("batched", clients)]
        same = sum(a == b for a, b in zip(one["answers"], many["answers"]))
        print(
            f"{clients:>7}  {one['rps']:>6.2f} req/s p50 {one['p50']:>5.2f} s  "
            f"{many['rps']:>6.2f} req/s p50 {many['p50']:>5.2f} s  "
            f"{many['rps'] / one['rps']:>15.2f}x  {same:>10}/{len(one['answers'])}"
        )
        print(f"{'':>7}  {'p95':>12} {one['p95']:>7.2f} s  {'p95':>12} {many['p95']:>7.2f} s")
    mismatched = sum(
        a != b
        for c in args.clients
        for a, b in zip(results[("one at a time", c)]["answers"], results[("batched", c)]["answers"])
    )
    if mismatched:
        print(f"\n{mismatched} greedy answers differ between batched and one at a time")
        sys.exit(1)


if __name__ == "__main__":
    main()
