"""Does `tuneforge serve` stay up, answer in OpenAI's shape and keep its memory under a burst? A bounded load test.

Starts the real server on the quickstart experiment (the builtin model, `base`), with
API keys, and drives it with the official `openai` client:

    baseline   the same chat requests one after another (one client)
    burst      all chat requests at once, plus concurrent file uploads, from as many threads

For each side it prints requests per second, p50 / p95 latency of the answered chats,
the count of each status (200, and the 429 the bounded queue gives beyond 32 waiting),
any answer that was not OpenAI-shaped, and the server's resident memory before and
after (VmRSS, and its peak VmHWM from /proc). The burst passes when every request got
a 200 or an OpenAI-shaped 429 / 503, nothing hung, and the server answers afterwards.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --chats 64 --uploads 20 --max-tokens 8
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve_throughput import server

REPO = Path(__file__).resolve().parents[1]
LINE = (REPO / "examples" / "data" / "support" / "conversations.jsonl").read_text().splitlines()[0] + "\n"


def memory(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, in MiB (Linux)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def chat(client, n: int, max_tokens: int) -> tuple[int, float, bool]:
    import openai

    started = time.perf_counter()
    try:
        reply = client.chat.completions.create(
            model="base",
            max_tokens=max_tokens,
            temperature=0,
            messages=[{"role": "user", "content": f"Give me one tip about saving energy, number {n}."}],
        )
        return 200, time.perf_counter() - started, reply.choices[0].message.content is not None
    except openai.APIStatusError as exc:
        shaped = isinstance(exc.body, dict) and {"message", "type", "code"} <= set(exc.body)
        return exc.status_code, time.perf_counter() - started, shaped


def upload(client, n: int) -> tuple[int, float, bool]:
    import openai

    started = time.perf_counter()
    try:
        made = client.files.create(file=(f"part-{n}.jsonl", (LINE * 50).encode()), purpose="fine-tune")
        return 200, time.perf_counter() - started, made.bytes == len(LINE) * 50
    except openai.APIStatusError as exc:
        return exc.status_code, time.perf_counter() - started, isinstance(exc.body, dict)


def summary(name: str, results: list[tuple[int, float, bool]], wall: float) -> dict:
    answered = sorted(seconds for status, seconds, _ in results if status == 200)
    statuses: dict[int, int] = {}
    for status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    p95 = answered[min(len(answered) - 1, int(0.95 * len(answered)))] if answered else float("nan")
    row = {
        "name": name,
        "n": len(results),
        "answered": len(answered),
        "rps": len(answered) / wall,
        "wall": wall,
        "p50": statistics.median(answered) if answered else float("nan"),
        "p95": p95,
        "statuses": statuses,
        "unshaped": sum(not ok for _, _, ok in results),
    }
    print(
        f"{name:<28} {row['answered']:>3}/{row['n']:<3} answered in {wall:6.1f} s ({row['rps']:.2f}/s), "
        f"p50 {row['p50']:.2f} s, "
        f"p95 {row['p95']:.2f} s, statuses {statuses}, not OpenAI-shaped: {row['unshaped']}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tuneforge-serve-load-"))
    key = f"sk-{secrets.token_urlsafe(24)}"
    with server(16, workdir, env={**os.environ, "TUNEFORGE_API_KEYS": f"load:{key}"}, api_key=key) as client:
        pid = client.server_pid
        chat(client, 0, args.max_tokens)  # load the model untimed
        before = memory(pid)

        started = time.perf_counter()
        baseline = summary(
            "baseline: one at a time",
            [chat(client, n, args.max_tokens) for n in range(args.chats)],
            time.perf_counter() - started,
        )
        after_baseline = memory(pid)

        with ThreadPoolExecutor(args.chats + args.uploads) as pool:
            started = time.perf_counter()
            chats = [pool.submit(chat, client, n, args.max_tokens) for n in range(args.chats)]
            uploads = [pool.submit(upload, client, n) for n in range(args.uploads)]
            chat_results = [f.result(timeout=900) for f in chats]
            upload_results = [f.result(timeout=900) for f in uploads]
            wall = time.perf_counter() - started
        burst = summary(f"burst: {args.chats} chats at once", chat_results, wall)
        summary(f"burst: {args.uploads} uploads at once", upload_results, wall)
        after_burst = memory(pid)
        alive = chat(client, 0, args.max_tokens)[0] == 200

    print(
        f"\nserver memory (MiB): loaded {before['VmRSS']:.0f}, after baseline {after_baseline['VmRSS']:.0f}, "
        f"after burst {after_burst['VmRSS']:.0f} (peak {after_burst['VmHWM']:.0f})"
    )
    print(
        f"throughput ratio burst / one at a time: {burst['rps'] / baseline['rps']:.2f}x; "
        f"p50 {baseline['p50']:.2f} s -> {burst['p50']:.2f} s; answers after the burst: {'yes' if alive else 'NO'}"
    )
    bad = [r for r in chat_results + upload_results if r[0] not in (200, 429, 503) or not r[2]]
    if bad or not alive:
        print(f"FAILED: {len(bad)} requests without an answer or an OpenAI-shaped 429/503")
        sys.exit(1)


if __name__ == "__main__":
    main()
