"""`tuneforge chat`: a terminal chat with streamed answers and multi-turn history.

Commands: /reset (forget the conversation), /system <text> (set the system
prompt), /model <system> (switch systems, keeping the history: base, finetuned,
their +rag variants, openai:<model>), /exit. A +rag system prints the sources it
retrieved under each answer; the history keeps the plain question, and only the
turn being answered carries the retrieved passages (as in training).
"""

from __future__ import annotations

import sys

from tuneforge.errors import TuneforgeError
from tuneforge.infer.engine import Answer, Settings

HELP = "commands: /reset, /system <text>, /model <system>, /exit"


def chat_loop(experiment, run, system_name: str, stdin=None, stdout=None) -> int:
    from tuneforge.systems import Systems

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    systems = Systems(experiment, run)
    current = system_name
    systems.get(current)
    system_prompt: str | None = None
    history: list[dict] = []
    settings = Settings(max_new_tokens=experiment.eval.max_new_tokens, seed=experiment.seed)
    stdout.write(f"chatting with {current} (available: {', '.join(systems.available())}); {HELP}\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            stdout.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system_prompt = text[len("/system") :].strip() or None
            stdout.write(f"(system prompt {'set' if system_prompt else 'cleared'})\n")
            continue
        if text.startswith("/model"):
            wanted = text[len("/model") :].strip()
            try:
                systems.get(wanted)
            except TuneforgeError as exc:
                stdout.write(f"({exc})\n")
                continue
            current = wanted
            stdout.write(f"(now chatting with {current})\n")
            continue
        if text.startswith("/"):
            stdout.write(f"(unknown command; {HELP})\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
        stdout.write(f"{current}> ")
        reply: Answer | None = None
        for piece in systems.get(current).stream(messages, settings):
            if isinstance(piece, Answer):
                reply = piece
            else:
                stdout.write(piece)
                stdout.flush()
        stdout.write("\n")
        if reply is not None and reply.sources:
            for n, hit in enumerate(reply.sources, 1):
                stdout.write(f"  [{n}] {hit.source} ({hit.score:.2f})\n")
        history.append({"role": "assistant", "content": reply.text if reply else ""})
    return 0
