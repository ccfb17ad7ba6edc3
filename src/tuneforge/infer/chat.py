"""`tuneforge chat`: a terminal chat with streamed answers and multi-turn history.

Commands: /reset (forget the conversation), /system (show the system prompt),
/system <text> (set it), /system off (send none), /model <system> (switch systems,
keeping the history: base, finetuned, their +rag variants, openai:<model>), /exit.
The chat starts with the system prompt the run trained with, unless
`--system-prompt` says otherwise ('' for none). Ctrl-C stops the answer being
streamed (what was shown stays in the history) and the chat goes on. A +rag system prints the sources it
retrieved under each answer; the history keeps the plain question, and only the
turn being answered carries the retrieved passages (as in training).
"""

from __future__ import annotations

import sys

from tuneforge.errors import TuneforgeError
from tuneforge.infer.engine import Answer, Settings

HELP = "commands: /reset, /system [<text> | off], /model <system>, /exit"


def chat_loop(experiment, run, system_name: str, stdin=None, stdout=None, system_prompt: str | None = None) -> int:
    from tuneforge.systems import Systems, parse, training_system_prompt

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    systems = Systems(experiment, run, system_prompt="")  # the chat sends its own system prompt, shown and changeable
    current = system_name
    systems.get(current)
    if system_prompt is None:
        system_prompt = training_system_prompt(run, parse(current))
        origin = "the one the run trained with"
    else:
        origin = "from --system-prompt"
    system_prompt = system_prompt or None
    history: list[dict] = []
    settings = Settings(max_new_tokens=experiment.eval.max_new_tokens, seed=experiment.seed)
    stdout.write(f"chatting with {current} (available: {', '.join(systems.available())}); {HELP}\n")
    stdout.write(f"(system prompt, {origin}: {system_prompt!r})\n" if system_prompt else "(no system prompt)\n")
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
            given = text[len("/system") :].strip()
            if given:
                system_prompt = None if given == "off" else given
                stdout.write(f"(system prompt {'set' if system_prompt else 'off'})\n")
            else:
                stdout.write(f"(system prompt: {system_prompt!r})\n" if system_prompt else "(no system prompt)\n")
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
        shown = ""
        stream = systems.get(current).stream(messages, settings)
        try:
            for piece in stream:
                if isinstance(piece, Answer):
                    reply = piece
                else:
                    shown += piece
                    stdout.write(piece)
                    stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            stream.close()
            stdout.write("\n(answer stopped; /exit or Ctrl-D ends the chat)\n")
            if shown.strip():
                history.append({"role": "assistant", "content": shown.strip()})  # what was shown stays in the conversation
            else:
                history.pop()
            continue
        stdout.write("\n")
        if reply is not None and reply.sources:
            for n, hit in enumerate(reply.sources, 1):
                stdout.write(f"  [{n}] {hit.source} ({hit.score:.2f})\n")
        history.append({"role": "assistant", "content": reply.text if reply else ""})
    return 0
