"""`tuneforge chat`: a terminal chat with streamed answers and multi-turn history.

Commands: /reset (forget the conversation), /system <text> (set the system
prompt), /model base|finetuned (switch systems, keeping the history), /exit.
"""

from __future__ import annotations

import sys

from tuneforge.errors import TuneforgeError
from tuneforge.infer.engine import Answer, Engine, Settings

HELP = "commands: /reset, /system <text>, /model base|finetuned, /exit"


def chat_loop(experiment, run, system_name: str, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    engines: dict[str, Engine] = {}

    def engine(name: str) -> Engine:
        if name not in engines:
            engines[name] = Engine.load(experiment, name, run)
        return engines[name]

    current = system_name
    engine(current)
    system_prompt: str | None = None
    history: list[dict] = []
    settings = Settings(max_new_tokens=experiment.eval.max_new_tokens, seed=experiment.seed)
    stdout.write(f"chatting with {current}; {HELP}\n")
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
                engine(wanted)
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
        reply = ""
        for piece in engine(current).stream(messages, settings):
            if isinstance(piece, Answer):
                reply = piece.text
            else:
                stdout.write(piece)
                stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0
