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
from typing import TYPE_CHECKING

from tuneforge.engine.transformers import Answer, Settings
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

HELP = "commands: /reset, /system [<text> | off], /model <system>, /exit"


def training_tools(run: RunDir) -> list | None:
    """The tools list the run's training examples carry most often (None when they have none)."""
    import json
    from collections import Counter

    train = run.sub("data", "train.jsonl") if run is not None else None
    if train is None or not train.exists():
        return None
    with open(train, encoding="utf-8") as fh:
        found = Counter(json.dumps(r["tools"], sort_keys=True) for r in map(json.loads, fh) if r.get("tools"))
    return json.loads(found.most_common(1)[0][0]) if found else None


def chat_loop(
    experiment: Experiment,
    run: RunDir,
    system_name: str,
    stdin=None,
    stdout=None,
    system_prompt: str | None = None,
    tools: list | None = None,
) -> int:
    from tuneforge.systems import Systems, training_system_prompt

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    systems = Systems(experiment, run, system_prompt="")  # the chat sends its own system prompt, shown and changeable
    current = system_name
    systems.get(current)
    if system_prompt is None:
        system_prompt = training_system_prompt(run, systems.spec(current))  # the folder the model loads from
        origin = "the one the run trained with"
    else:
        origin = "from --system-prompt"
    system_prompt = system_prompt or None
    history: list[dict] = []
    tools = tools if tools is not None else training_tools(run)
    settings = Settings(max_new_tokens=experiment.eval.max_new_tokens, seed=experiment.seed, tools=tools)
    stdout.write(f"chatting with {current} (available: {', '.join(systems.available())}); {HELP}\n")
    stdout.write(f"(system prompt, {origin}: {system_prompt!r})\n" if system_prompt else "(no system prompt)\n")
    if tools:
        stdout.write(
            f"(tools the model may call: {', '.join(t['function']['name'] for t in tools)}; "
            "you type each call's result)\n"
        )
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
        _answer_turn(systems, current, system_prompt, history, settings, stdin, stdout)
    return 0


def _answer_turn(
    systems, current: str, system_prompt: str | None, history: list[dict], settings, stdin, stdout
) -> None:
    """The model's answer to the last turn; after a tool call, the results you type, and its answer to them."""
    for _ in range(4):  # a few rounds of calls, then the word is yours again
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
        stdout.write(f"{current}> ")
        reply: Answer | None = None
        shown = ""
        stream = systems.get(current).stream(messages, settings)
        try:
            for piece in stream:
                if isinstance(piece, Answer):
                    reply = piece
                elif not settings.calls_tools:  # with tools the answer may be a call: shown whole, once known
                    shown += piece
                    stdout.write(piece)
                    stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            stream.close()
            stdout.write("\n(answer stopped; /exit or Ctrl-D ends the chat)\n")
            if shown.strip():
                history.append(
                    {"role": "assistant", "content": shown.strip()}
                )  # what was shown stays in the conversation
            elif history and history[-1]["role"] == "user":
                history.pop()
            return
        if settings.calls_tools and reply is not None and reply.text:
            stdout.write(reply.text)
        stdout.write("\n")
        if reply is not None and reply.sources:
            for n, hit in enumerate(reply.sources, 1):
                stdout.write(f"  [{n}] {hit.source} ({hit.score:.2f})\n")
        if reply is None or not reply.tool_calls:
            history.append({"role": "assistant", "content": reply.text if reply else ""})
            return
        history.append({"role": "assistant", "content": reply.text or None, "tool_calls": reply.tool_calls})
        for call in reply.tool_calls:
            stdout.write(f"  (tool call) {call['function']['name']}({call['function']['arguments']})\n  result> ")
            stdout.flush()
            result = stdin.readline().strip()
            history.append({"role": "tool", "tool_call_id": call["id"], "content": result or "(no result)"})
