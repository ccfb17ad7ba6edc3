"""The demo page: Chat (one system, multi-turn, streamed), Compare (2 to 4 systems side by side), Contribute and Arena.

Every answer can be judged where it is read: thumbs up or down and "write a better
answer" in Chat, left / right / tie / both bad for a pair in Compare, and a prompt with
its ideal answer in Contribute. Each judgement is appended to runs/<name>/feedback/
(feedback/store.py) with the conversation, the answers, which model gave each, the
retrieved sources, the settings and the login; Arena shows the leaderboard it adds up to.

`build_app` returns the Gradio Blocks without starting anything; `launch` checks the
access settings (demo/access.py), then serves the page until Ctrl-C.

Each tab has its builder (`_chat_tab`, `_compare_tab`, ...). The handlers are plain
module-level functions that take the `Page` (the systems and the feedback store) first,
so a test calls them directly; `_bind` hands them to Gradio with the page given.
"""

from __future__ import annotations

import inspect
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr  # module-level: the handlers' `gr.Request` annotations are resolved against this module

from tuneforge.demo.access import decide, quiet_gradio
from tuneforge.demo.answers import answer_record, ask, ask_all, conversation, sources_markdown
from tuneforge.engine.transformers import Settings
from tuneforge.errors import TuneforgeError
from tuneforge.systems import LOCAL_NAMES, RAG_SUFFIX, Systems, parse

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.demo.answers import Reply
    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.run import RunDir

COMPARE_MAX = 4
NO_PRESET = "(none)"
MAX_TOKENS_LIMIT = 2048  # the slider's top; SmolLM-sized models have 2k-8k contexts
VERDICTS = {"left": "◀ Left is better", "right": "Right is better ▶", "tie": "Tie", "both_bad": "Both bad"}
VERSUS = "  vs  "  # between the two sides of a pair to vote on; `vote` splits the label on it


@dataclass
class Page:
    """What the handlers share beyond their inputs: the systems that answer and the store judgements go to."""

    systems: Systems
    store: FeedbackStore
    listed: frozenset[str] | None = None  # the only systems a visitor may pick; None: any name typed (loopback)

    def get(self, name: str):
        """The system `name`, if this page may answer with it."""
        if self.listed is not None and name not in self.listed:
            raise TuneforgeError(
                f"{name!r} is not one of this page's systems ({', '.join(sorted(self.listed))}); a page beyond "
                "loopback answers only with the run's systems and those the experiment's eval.systems lists"
            )
        return self.systems.get(name)


@dataclass
class Controls:
    """The settings above the tabs; Chat, Compare and Contribute all read them."""

    system_prompt: gr.Textbox
    temperature: gr.Slider
    max_tokens: gr.Slider


def system_choices(experiment: Experiment, systems: Systems) -> list[str]:
    """What the run can answer with now, then the other systems eval names (openai:, adapter:, merged:)."""
    names = systems.available()
    for name in experiment.eval.systems:
        try:
            spec = parse(name)
        except TuneforgeError:  # eval's baselines (tfidf, ngram) are not chat systems
            continue
        if spec.model not in LOCAL_NAMES and name not in names:
            names.append(name)
    return names


def compare_defaults(experiment: Experiment, names: list[str]) -> list[str]:
    """eval.systems that can answer now, topped up from the list to at least two."""
    picked = [n for n in experiment.eval.systems if n in names][:COMPARE_MAX]
    picked += [n for n in names if n not in picked][: max(0, 2 - len(picked))]
    return picked


def _settings(temperature, max_tokens) -> Settings:
    return Settings(max_new_tokens=int(max_tokens), temperature=float(temperature))


def _settings_record(temperature, max_tokens) -> dict:
    """The settings as feedback keeps them next to an answer."""
    return {"temperature": float(temperature), "max_tokens": int(max_tokens)}


def _column(reply: Reply) -> str:
    """One Compare column: the system, its answer so far, its timing, and its sources when it retrieved."""
    body = f"**Error:** {reply.error}" if reply.error else (reply.text or "…")
    text = f"#### {reply.system}\n\n{body}\n\n<sub>{reply.summary()}</sub>"
    if reply.answer is not None and reply.answer.sources:
        text += (
            f"\n\n<details><summary>Sources ({len(reply.answer.sources)} passages)</summary>\n\n"
            f"{sources_markdown(reply.answer.sources)}\n\n</details>"
        )
    return text


def _sources_message(sources: list) -> dict:
    """The folded box under a +rag answer in Chat: the passages it retrieved, titled with the files they came from."""
    files = ", ".join(dict.fromkeys(hit.source for hit in sources))
    metadata = {"title": f"Sources: {files}", "log": f"{len(sources)} retrieved passages", "status": "done"}
    return {"role": "assistant", "content": sources_markdown(sources), "metadata": metadata}


def _login(request) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def arena_markdown(store: FeedbackStore) -> str:
    from tuneforge.feedback.summary import markdown, summarise

    records, _ = store.read()
    if not any(r["kind"] == "vote" for r in records):
        return "No votes yet: compare two systems and say which answer is better."
    return markdown(summarise(records)).split("\n", 1)[1]


# --------------------------------------------------------------------------- handlers


def chat(page: Page, text, name, system_prompt, temperature, max_tokens, history, shown):
    """Streams one answer into the chat; the last update also keeps it for the feedback buttons and the correction box.

    Yields (chat shown, history, shown, message box, status, newest answer, correction box).
    """
    text = (text or "").strip()
    if not text:
        raise gr.Error("write a message first")
    messages = conversation(system_prompt, history, text)
    before = [*shown, {"role": "user", "content": text}]
    reply = None
    name = (name or "").strip()
    try:
        for reply in ask(page.get, name, messages, _settings(temperature, max_tokens)):
            streamed = [*before, {"role": "assistant", "content": reply.text or "…"}]
            yield streamed, history, shown, "", reply.summary(), gr.update(), gr.update()
    except TuneforgeError as exc:  # e.g. no adapter yet: give the message back to fix and resend
        yield shown, history, shown, text, f"{name}: error", gr.update(), gr.update()
        raise gr.Error(str(exc)) from None
    answer = reply.answer
    after = [*before, {"role": "assistant", "content": answer.text}]
    if answer.sources:
        after.append(_sources_message(answer.sources))
    turns = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
    newest = {
        "messages": messages,
        "answer": answer_record(page.systems, name, answer),
        "settings": _settings_record(temperature, max_tokens),
    }
    yield after, turns, after, "", reply.summary(), newest, answer.text


def compare(page: Page, text, chosen, system_prompt, temperature, max_tokens):
    """Streams every chosen system's answer into its column; the vote buttons open once all are complete.

    Yields a list: the COMPARE_MAX columns, the answers for the votes, the pair to vote on, the vote buttons.
    """
    text = (text or "").strip()
    chosen = list(dict.fromkeys(n.strip() for n in chosen or [] if n.strip()))
    if not 2 <= len(chosen) <= COMPARE_MAX:
        raise gr.Error(f"pick 2 to {COMPARE_MAX} systems")
    if not text:
        raise gr.Error("write a prompt first")
    hidden = [gr.update(value="", visible=False)] * (COMPARE_MAX - len(chosen))
    messages = conversation(system_prompt, [], text)
    replies = []
    closed = [gr.update(interactive=False)] * len(VERDICTS)  # no vote on answers still coming
    for replies in ask_all(page.get, chosen, messages, _settings(temperature, max_tokens)):
        columns = [gr.update(value=_column(r), visible=True) for r in replies]
        yield [*columns, *hidden, None, gr.update(choices=[], value=None), *closed]
    answered = [(i, r) for i, r in enumerate(replies) if r.answer is not None]
    state = {
        "messages": messages,
        "settings": _settings_record(temperature, max_tokens),
        "answers": {i: answer_record(page.systems, r.system, r.answer) for i, r in answered},
    }
    choices = [
        f"{i + 1}. {a.system}{VERSUS}{j + 1}. {b.system}"
        for n, (i, a) in enumerate(answered)
        for j, b in answered[n + 1 :]
    ]
    columns = [gr.update(value=_column(r), visible=True) for r in replies]
    pair = gr.update(choices=choices, value=choices[0] if choices else None)
    yield [*columns, *hidden, state, pair, *[gr.update(interactive=bool(choices))] * len(VERDICTS)]


def save(page: Page, record: dict, request, done: str) -> str:
    """Append one record; the page says what happened (never raises: a typed correction must stay on screen)."""
    try:
        page.store.append({**record, "login": _login(request)})
    except (TuneforgeError, OSError) as exc:
        return f"**Not saved:** {exc}. Your text is still here; try again."
    return done


def thumb(page: Page, value: str, newest, request: gr.Request) -> str:
    if not newest:
        return "Ask something first, then judge the answer."
    done = f"Saved: thumbs {value} for {newest['answer']['system']}."
    return save(page, {"kind": "thumb", "value": value, **newest}, request, done)


def corrected(page: Page, text, newest, request: gr.Request) -> str:
    if not newest:
        return "Ask something first, then write the better answer."
    if not (text or "").strip() or text.strip() == newest["answer"]["text"].strip():
        return "Edit the answer first: the box still holds the model's own words."
    done = f"Saved: your better answer to {newest['answer']['system']}'s."
    return save(page, {"kind": "correction", "corrected": text.strip(), **newest}, request, done)


def vote(page: Page, verdict: str, shown_pair, state, request: gr.Request) -> str:
    """`verdict` on the pair on screen, e.g. "1. base  vs  2. base+rag", from the answers `compare` kept."""
    if not state or not shown_pair:
        return "Compare two systems first, then vote."
    left, right = (int(side.strip().split(".", 1)[0]) - 1 for side in shown_pair.split(VERSUS))
    answers = state["answers"]
    record = {
        "kind": "vote",
        "verdict": verdict,
        "messages": state["messages"],
        "settings": state["settings"],
        "left": answers.get(left, answers.get(str(left))),
        "right": answers.get(right, answers.get(str(right))),
    }
    said = {
        "left": f"{record['left']['system']} is better",
        "right": f"{record['right']['system']} is better",
        "tie": "a tie",
        "both_bad": "both bad",
    }[verdict]
    return save(page, record, request, f"Saved: {said}.")


def contribute(page: Page, prompt_text, answer_text, system_prompt, request: gr.Request) -> str:
    if not (prompt_text or "").strip() or not (answer_text or "").strip():
        return "Write both the prompt and the ideal answer."
    messages = conversation(system_prompt, [], prompt_text.strip())
    record = {"kind": "contribution", "messages": messages, "answer": answer_text.strip()}
    return save(page, record, request, "Saved: thank you, the example is in the next training round's data.")


def _cleared():
    """Chat's Clear: the chat, both histories, the status line and the newest answer."""
    return [], [], [], "", None


def _bind(handler: Callable, *given) -> Callable:
    """`handler` with its first arguments given, as Gradio must see it.

    Not functools.partial: Gradio finds the parameter that gets the gr.Request (the login) by its type hint, and it
    reads no hints through a partial, so the login would quietly never arrive. A streaming handler stays a generator
    function, which is how Gradio tells it streams.
    """
    if inspect.isgeneratorfunction(handler):

        def bound(*args):
            yield from handler(*given, *args)
    else:

        def bound(*args):
            return handler(*given, *args)

    signature = inspect.signature(handler)
    kept = list(signature.parameters.values())[len(given) :]
    bound.__name__ = bound.__qualname__ = handler.__name__
    bound.__signature__ = signature.replace(parameters=kept)
    bound.__annotations__ = {p.name: p.annotation for p in kept if p.annotation is not p.empty}
    typing.get_type_hints(bound)  # a hint that cannot be resolved fails here; Gradio would drop every hint silently
    return bound


# --------------------------------------------------------------------------- the page


def build_app(
    experiment: Experiment,
    run: RunDir,
    systems: Systems | None = None,
    system_prompt: str | None = None,
    typed_systems: bool = True,
) -> gr.Blocks:
    """The page. Its system prompt box starts with `system_prompt`, else the one the run trained with, and the
    page sends exactly what the box holds (empty: none). Without `typed_systems` (a page beyond loopback) it
    answers only with the systems its lists offer."""
    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.systems import training_system_prompt

    systems = systems or Systems(experiment, run, system_prompt="")
    default_prompt = (training_system_prompt(run) if system_prompt is None else system_prompt) or ""
    names = system_choices(experiment, systems)
    page = Page(systems, FeedbackStore(run.sub("feedback")), None if typed_systems else frozenset(names))

    with gr.Blocks(title=f"tuneforge demo: {experiment.name}", analytics_enabled=False) as app:
        controls = _controls(experiment, run, default_prompt)
        with gr.Tabs():
            _chat_tab(page, names, controls)
            _compare_tab(page, names, compare_defaults(experiment, names), controls)
            _contribute_tab(page, controls)
            _arena_tab(page)

    app.queue(
        max_size=experiment.demo.queue_size, default_concurrency_limit=experiment.demo.concurrency, api_open=False
    )
    return app


def _controls(experiment: Experiment, run: RunDir, default_prompt: str) -> Controls:
    """The heading, then the settings every tab uses; a format preset fills in the system prompt."""
    presets = experiment.demo.presets
    rag = f" `{RAG_SUFFIX}` systems answer from retrieved passages and show them." if experiment.rag is not None else ""
    gr.Markdown(
        f"### tuneforge demo: {experiment.name}\nRun directory `{run.path}`. A model loads on its first answer.{rag}"
    )
    with gr.Row():
        preset = gr.Dropdown([NO_PRESET, *presets], value=NO_PRESET, label="Format preset", elem_id="preset")
        system_prompt = gr.Textbox(
            default_prompt,
            label="System prompt" + (" (the one the run trained with)" if default_prompt else ""),
            lines=2,
            scale=3,
            elem_id="system-prompt",
            placeholder="optional; a preset fills it in",
        )
        temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature")
        start = min(experiment.eval.max_new_tokens, MAX_TOKENS_LIMIT)
        max_tokens = gr.Slider(1, MAX_TOKENS_LIMIT, value=start, step=1, label="Max tokens", elem_id="max-tokens")
    preset.change(_bind(_preset_prompt, presets, default_prompt), preset, system_prompt, queue=False)
    return Controls(system_prompt, temperature, max_tokens)


def _preset_prompt(presets: dict, default_prompt: str, name):
    return presets.get(name, default_prompt)


def _chat_tab(page: Page, names: list[str], controls: Controls) -> None:
    """One system, multi-turn and streamed, with a thumb and a better answer for the newest reply."""
    with gr.Tab("Chat", id="chat"):
        first = "finetuned" if "finetuned" in names else names[0]
        system = gr.Dropdown(
            names,
            value=first,
            allow_custom_value=page.listed is None,
            label="System",
            info="or type openai:<model>" if page.listed is None else None,
            elem_id="system",
        )
        chatbot = gr.Chatbot(
            elem_id="chatbot",
            height=440,
            buttons=["copy"],
            feedback_options=None,
            group_consecutive_messages=False,
            label="Chat",
        )
        with gr.Row():
            message = gr.Textbox(
                show_label=False, placeholder="Ask something and press Enter", scale=6, elem_id="message"
            )
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", elem_id="stop")
            clear = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown(elem_id="chat-status")
        history = gr.State([])  # what the model sees: user and assistant turns, without the sources
        shown = gr.State([])  # what the chat shows: the same, plus a sources box under each +rag answer
        last = gr.State(None)  # the newest answer, for the feedback buttons: its conversation, answer and settings
        correction = _chat_feedback(page, last)

    inputs = [message, system, controls.system_prompt, controls.temperature, controls.max_tokens, history, shown]
    outputs = [chatbot, history, shown, message, status, last, correction]
    answer = _bind(chat, page)
    events = [send.click(answer, inputs, outputs), message.submit(answer, inputs, outputs)]
    stop.click(None, cancels=events, queue=False)
    clear.click(_cleared, None, [chatbot, history, shown, status, last], queue=False)


def _chat_feedback(page: Page, last: gr.State) -> gr.Textbox:
    """The thumbs and the better answer under the chat; returns the correction box, which each answer fills in."""
    with gr.Row():
        thumb_up = gr.Button("👍 Good answer", size="sm", elem_id="thumb-up")
        thumb_down = gr.Button("👎 Bad answer", size="sm", elem_id="thumb-down")
    with gr.Accordion("Write a better answer", open=False, elem_id="correction-panel"):
        correction = gr.Textbox(
            show_label=False, lines=4, elem_id="correction", placeholder="the newest answer appears here to edit"
        )
        save_correction = gr.Button("Save the better answer", elem_id="save-correction")
    said = gr.Markdown(elem_id="chat-feedback")
    thumb_up.click(_bind(thumb, page, "up"), last, said, queue=False)
    thumb_down.click(_bind(thumb, page, "down"), last, said, queue=False)
    save_correction.click(_bind(corrected, page), [correction, last], said, queue=False)
    return correction


def _compare_tab(page: Page, names: list[str], compared: list[str], controls: Controls) -> None:
    """One prompt to 2 to COMPARE_MAX systems side by side, then a vote on a pair of their answers."""
    with gr.Tab("Compare", id="compare"):
        picked = gr.Dropdown(
            names,
            value=compared,
            multiselect=True,
            max_choices=COMPARE_MAX,
            allow_custom_value=page.listed is None,
            label=f"Systems (2 to {COMPARE_MAX})",
            elem_id="compare-systems",
        )
        with gr.Row():
            prompt = gr.Textbox(
                show_label=False, placeholder="One prompt for every system", scale=6, elem_id="compare-prompt"
            )
            run_compare = gr.Button("Compare", variant="primary", elem_id="compare-run")
        with gr.Row(equal_height=True):
            columns = [
                gr.Markdown(container=True, min_height=160, visible=i < len(compared), elem_id=f"compare-{i}")
                for i in range(COMPARE_MAX)
            ]
        answers = gr.State(None)  # the answers on screen, for the votes
        # radio buttons, not a dropdown: a dropdown given new choices and a value in one update can draw an empty box
        pair = gr.Radio([], label="Vote on the pair", elem_id="vote-pair", interactive=True)
        with gr.Row():
            buttons = {
                verdict: gr.Button(label, size="sm", interactive=False, elem_id=f"vote-{verdict.replace('_', '-')}")
                for verdict, label in VERDICTS.items()
            }
        vote_status = gr.Markdown(elem_id="vote-status")

    inputs = [prompt, picked, controls.system_prompt, controls.temperature, controls.max_tokens]
    outputs = [*columns, answers, pair, *buttons.values()]
    answer = _bind(compare, page)
    run_compare.click(answer, inputs, outputs)
    prompt.submit(answer, inputs, outputs)
    for verdict, button in buttons.items():
        # Arena reads the store when shown
        button.click(_bind(vote, page, verdict), [pair, answers], vote_status, queue=False)


def _contribute_tab(page: Page, controls: Controls) -> None:
    """A prompt and its ideal answer, for the next training round."""
    with gr.Tab("Contribute", id="contribute"):
        gr.Markdown(
            "An example for the next training round: a prompt and the answer you want "
            "(the system prompt above goes with it)."
        )
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="contribute-prompt")
        answer = gr.Textbox(label="The ideal answer", lines=5, elem_id="contribute-answer")
        button = gr.Button("Contribute the example", variant="primary", elem_id="contribute-save")
        status = gr.Markdown(elem_id="contribute-status")
    button.click(_bind(contribute, page), [prompt, answer, controls.system_prompt], status, queue=False)


def _arena_tab(page: Page) -> None:
    """The leaderboard the votes add up to, read from the store each time the tab is shown."""
    with gr.Tab("Arena", id="arena") as tab:
        refresh = gr.Button("Refresh", size="sm", elem_id="arena-refresh")
        board = gr.Markdown(elem_id="arena")
    leaderboard = _bind(arena_markdown, page.store)
    refresh.click(leaderboard, None, board, queue=False)
    tab.select(leaderboard, None, board, queue=False)


def launch(
    experiment: Experiment,
    run: RunDir,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    system_prompt: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> int:
    """Serve the page until Ctrl-C; host/port default to the demo section, share to demo.share."""
    access = decide(experiment.demo, run, host=host, port=port, share=share, allowed_hosts=allowed_hosts)
    quiet_gradio(access)
    systems = Systems(experiment, run, system_prompt="")  # the page sends the prompt its box holds
    app = build_app(experiment, run, systems, system_prompt, typed_systems=access.typed_systems)
    first = "finetuned" if "finetuned" in systems.available() else "base"
    # load the Chat tab's default model while the browser opens, so the first answer does not wait for it
    threading.Thread(target=_warm, args=(systems, first), daemon=True).start()
    try:
        _, _, share_url = app.launch(prevent_thread_lock=True, **access.launch_kwargs())
    except OSError as exc:
        raise TuneforgeError(f"cannot serve the page on {access.url}: {exc}") from None
    login = f" (login from {experiment.demo.auth_env})" if access.auth else ""
    print(f"demo of {experiment.name} on {access.url}{login}; Ctrl-C stops it", flush=True)
    if share_url:
        print(f"public share link: {share_url}", flush=True)
    app.block_thread()
    return 0


def _warm(systems: Systems, name: str) -> None:
    try:
        systems.get(name)
    except TuneforgeError as exc:
        print(f"could not load {name}: {exc}", file=sys.stderr, flush=True)
