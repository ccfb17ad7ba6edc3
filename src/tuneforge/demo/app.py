"""The demo page: Chat (one system, multi-turn, streamed), Compare (2 to 4 systems side by side), Contribute and Arena.

Every answer can be judged where it is read: thumbs up or down and "write a better
answer" in Chat, left / right / tie / both bad for a pair in Compare, and a prompt with
its ideal answer in Contribute. Each judgement is appended to runs/<name>/feedback/
(feedback/store.py) with the conversation, the answers, which model gave each, the
retrieved sources, the settings and the login; Arena shows the leaderboard it adds up to.

`build_app` returns the Gradio Blocks without starting anything; `launch` checks the
access settings (demo/access.py), then serves the page until Ctrl-C.
"""

from __future__ import annotations

import sys
import threading

import gradio as gr  # module-level: the handlers' `gr.Request` annotations are resolved against this module

from tuneforge.demo.access import decide, is_loopback, quiet_gradio
from tuneforge.demo.answers import answer_record, ask, ask_all, conversation, sources_markdown
from tuneforge.errors import TuneforgeError
from tuneforge.engine.transformers import Settings
from tuneforge.systems import LOCAL_NAMES, RAG_SUFFIX, Systems, parse

COMPARE_MAX = 4
NO_PRESET = "(none)"
MAX_TOKENS_LIMIT = 2048  # the slider's top; SmolLM-sized models have 2k-8k contexts


def system_choices(experiment, systems: Systems) -> list[str]:
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


def compare_defaults(experiment, names: list[str]) -> list[str]:
    """eval.systems that can answer now, topped up from the list to at least two."""
    picked = [n for n in experiment.eval.systems if n in names][:COMPARE_MAX]
    picked += [n for n in names if n not in picked][: max(0, 2 - len(picked))]
    return picked


def _settings(temperature, max_tokens) -> Settings:
    return Settings(max_new_tokens=int(max_tokens), temperature=float(temperature))


def _column(reply) -> str:
    """One Compare column: the system, its answer so far, its timing, and its sources when it retrieved."""
    body = f"**Error:** {reply.error}" if reply.error else (reply.text or "…")
    text = f"#### {reply.system}\n\n{body}\n\n<sub>{reply.summary()}</sub>"
    if reply.answer is not None and reply.answer.sources:
        text += (f"\n\n<details><summary>Sources ({len(reply.answer.sources)} passages)</summary>\n\n"
                 f"{sources_markdown(reply.answer.sources)}\n\n</details>")
    return text


def _login(request) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def arena_markdown(store) -> str:
    from tuneforge.feedback.summary import markdown, summarise

    records, _ = store.read()
    if not any(r["kind"] == "vote" for r in records):
        return "No votes yet: compare two systems and say which answer is better."
    return markdown(summarise(records)).split("\n", 1)[1]


def build_app(experiment, run, systems: Systems | None = None, system_prompt: str | None = None):
    """The page. Its system prompt box starts with `system_prompt`, else the one the run trained with, and the
    page sends exactly what the box holds (empty: none)."""
    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.systems import training_system_prompt

    systems = systems or Systems(experiment, run, system_prompt="")
    default_prompt = (training_system_prompt(run) if system_prompt is None else system_prompt) or ""
    names = system_choices(experiment, systems)
    presets = experiment.demo.presets
    compared = compare_defaults(experiment, names)
    has_rag = experiment.rag is not None
    store = FeedbackStore(run.sub("feedback"))

    with gr.Blocks(title=f"tuneforge demo: {experiment.name}", analytics_enabled=False) as app:
        gr.Markdown(f"### tuneforge demo: {experiment.name}\nRun directory `{run.path}`. A model loads on its first answer."
                    + (f" `{RAG_SUFFIX}` systems answer from retrieved passages and show them." if has_rag else ""))
        with gr.Row():
            preset = gr.Dropdown([NO_PRESET, *presets], value=NO_PRESET, label="Format preset", elem_id="preset")
            system_prompt = gr.Textbox(default_prompt, label="System prompt" + (" (the one the run trained with)" if default_prompt else ""),
                                       lines=2, scale=3, elem_id="system-prompt", placeholder="optional; a preset fills it in")
            temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature")
            max_tokens = gr.Slider(1, MAX_TOKENS_LIMIT, value=min(experiment.eval.max_new_tokens, MAX_TOKENS_LIMIT), step=1,
                                   label="Max tokens", elem_id="max-tokens")
        preset.change(lambda name: presets.get(name, default_prompt), preset, system_prompt, queue=False)

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                system = gr.Dropdown(names, value="finetuned" if "finetuned" in names else names[0], allow_custom_value=True,
                                     label="System", info="or type openai:<model>", elem_id="system")
                chatbot = gr.Chatbot(elem_id="chatbot", height=440, buttons=["copy"], feedback_options=None,
                                     group_consecutive_messages=False, label="Chat")
                with gr.Row():
                    message = gr.Textbox(show_label=False, placeholder="Ask something and press Enter", scale=6, elem_id="message")
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="chat-status")
                history = gr.State([])  # what the model sees: user and assistant turns, without the sources
                shown = gr.State([])  # what the chat shows: the same, plus a sources box under each +rag answer
                last = gr.State(None)  # the newest answer, for the feedback buttons: its conversation, answer and settings
                with gr.Row():
                    thumb_up = gr.Button("👍 Good answer", size="sm", elem_id="thumb-up")
                    thumb_down = gr.Button("👎 Bad answer", size="sm", elem_id="thumb-down")
                with gr.Accordion("Write a better answer", open=False, elem_id="correction-panel"):
                    correction = gr.Textbox(show_label=False, lines=4, elem_id="correction",
                                            placeholder="the newest answer appears here to edit")
                    save_correction = gr.Button("Save the better answer", elem_id="save-correction")
                chat_feedback = gr.Markdown(elem_id="chat-feedback")

            with gr.Tab("Compare", id="compare"):
                picked = gr.Dropdown(names, value=compared, multiselect=True, max_choices=COMPARE_MAX, allow_custom_value=True,
                                     label=f"Systems (2 to {COMPARE_MAX})", elem_id="compare-systems")
                with gr.Row():
                    prompt = gr.Textbox(show_label=False, placeholder="One prompt for every system", scale=6, elem_id="compare-prompt")
                    compare_button = gr.Button("Compare", variant="primary", elem_id="compare-run")
                with gr.Row(equal_height=True):
                    columns = [gr.Markdown(container=True, min_height=160, visible=i < len(compared), elem_id=f"compare-{i}")
                               for i in range(COMPARE_MAX)]
                compared_state = gr.State(None)  # the answers on screen, for the votes
                # radio buttons, not a dropdown: a dropdown given new choices and a value in one update can draw an empty box
                pair = gr.Radio([], label="Vote on the pair", elem_id="vote-pair", interactive=True)
                with gr.Row():
                    vote_buttons = {verdict: gr.Button(label, size="sm", interactive=False, elem_id=f"vote-{verdict.replace('_', '-')}")
                                    for verdict, label in (("left", "◀ Left is better"), ("right", "Right is better ▶"),
                                                           ("tie", "Tie"), ("both_bad", "Both bad"))}
                vote_status = gr.Markdown(elem_id="vote-status")

            with gr.Tab("Contribute", id="contribute"):
                gr.Markdown("An example for the next training round: a prompt and the answer you want (the system prompt above goes with it).")
                contribute_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="contribute-prompt")
                contribute_answer = gr.Textbox(label="The ideal answer", lines=5, elem_id="contribute-answer")
                contribute_button = gr.Button("Contribute the example", variant="primary", elem_id="contribute-save")
                contribute_status = gr.Markdown(elem_id="contribute-status")

            with gr.Tab("Arena", id="arena") as arena_tab:
                arena_refresh = gr.Button("Refresh", size="sm", elem_id="arena-refresh")
                arena = gr.Markdown(elem_id="arena")

        def chat(text, name, system_prompt, temperature, max_tokens, history, shown):
            text = (text or "").strip()
            if not text:
                raise gr.Error("write a message first")
            messages = conversation(system_prompt, history, text)
            before = [*shown, {"role": "user", "content": text}]
            reply = None
            name = (name or "").strip()
            try:
                for reply in ask(systems.get, name, messages, _settings(temperature, max_tokens)):
                    yield [*before, {"role": "assistant", "content": reply.text or "…"}], history, shown, "", reply.summary(), gr.update(), gr.update()
            except TuneforgeError as exc:  # e.g. no adapter yet: give the message back to fix and resend
                yield shown, history, shown, text, f"{name}: error", gr.update(), gr.update()
                raise gr.Error(str(exc)) from None
            answer = reply.answer
            after = [*before, {"role": "assistant", "content": answer.text}]
            if answer.sources:
                after.append({"role": "assistant", "content": sources_markdown(answer.sources),
                              "metadata": {"title": f"Sources: {', '.join(dict.fromkeys(h.source for h in answer.sources))}",
                                           "log": f"{len(answer.sources)} retrieved passages", "status": "done"}})
            turns = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
            newest = {"messages": messages, "answer": answer_record(systems, name, answer),
                      "settings": {"temperature": float(temperature), "max_tokens": int(max_tokens)}}
            yield after, turns, after, "", reply.summary(), newest, answer.text

        chat_inputs = [message, system, system_prompt, temperature, max_tokens, history, shown]
        chat_outputs = [chatbot, history, shown, message, status, last, correction]
        events = [send.click(chat, chat_inputs, chat_outputs), message.submit(chat, chat_inputs, chat_outputs)]
        stop.click(None, cancels=events, queue=False)
        clear.click(lambda: ([], [], [], "", None), None, [chatbot, history, shown, status, last], queue=False)

        def save(record: dict, request, done: str) -> str:
            """Append one record; the page says what happened (never raises: a typed correction must stay on screen)."""
            try:
                store.append({**record, "login": _login(request)})
            except (TuneforgeError, OSError) as exc:
                return f"**Not saved:** {exc}. Your text is still here; try again."
            return done

        def thumb(value: str, newest, request):
            if not newest:
                return "Ask something first, then judge the answer."
            return save({"kind": "thumb", "value": value, **newest}, request, f"Saved: thumbs {value} for {newest['answer']['system']}.")

        def corrected(text, newest, request: gr.Request):
            if not newest:
                return "Ask something first, then write the better answer."
            if not (text or "").strip() or text.strip() == newest["answer"]["text"].strip():
                return "Edit the answer first: the box still holds the model's own words."
            return save({"kind": "correction", "corrected": text.strip(), **newest}, request,
                        f"Saved: your better answer to {newest['answer']['system']}'s.")

        def thumb_up_given(newest, request: gr.Request):
            return thumb("up", newest, request)

        def thumb_down_given(newest, request: gr.Request):
            return thumb("down", newest, request)

        thumb_up.click(thumb_up_given, last, chat_feedback, queue=False)
        thumb_down.click(thumb_down_given, last, chat_feedback, queue=False)
        save_correction.click(corrected, [correction, last], chat_feedback, queue=False)

        def compare(text, chosen, system_prompt, temperature, max_tokens):
            text = (text or "").strip()
            chosen = list(dict.fromkeys(n.strip() for n in chosen or [] if n.strip()))
            if not 2 <= len(chosen) <= COMPARE_MAX:
                raise gr.Error(f"pick 2 to {COMPARE_MAX} systems")
            if not text:
                raise gr.Error("write a prompt first")
            hidden = [gr.update(value="", visible=False)] * (COMPARE_MAX - len(chosen))
            messages = conversation(system_prompt, [], text)
            replies = []
            closed = [gr.update(interactive=False)] * len(vote_buttons)  # no vote on answers still coming
            for replies in ask_all(systems.get, chosen, messages, _settings(temperature, max_tokens)):
                yield [gr.update(value=_column(r), visible=True) for r in replies] + hidden + [None, gr.update(choices=[], value=None), *closed]
            answered = [(i, r) for i, r in enumerate(replies) if r.answer is not None]
            state = {"messages": messages, "settings": {"temperature": float(temperature), "max_tokens": int(max_tokens)},
                     "answers": {i: answer_record(systems, r.system, r.answer) for i, r in answered}}
            choices = [f"{i + 1}. {a.system}  vs  {j + 1}. {b.system}" for n, (i, a) in enumerate(answered) for j, b in answered[n + 1:]]
            yield [gr.update(value=_column(r), visible=True) for r in replies] + hidden + [
                state, gr.update(choices=choices, value=choices[0] if choices else None), *[gr.update(interactive=bool(choices))] * len(vote_buttons)]

        compare_inputs = [prompt, picked, system_prompt, temperature, max_tokens]
        compare_outputs = [*columns, compared_state, pair, *vote_buttons.values()]
        compare_button.click(compare, compare_inputs, compare_outputs)
        prompt.submit(compare, compare_inputs, compare_outputs)

        def vote(verdict: str, shown_pair, state, request):
            if not state or not shown_pair:
                return "Compare two systems first, then vote."
            left, right = (int(side.strip().split(".", 1)[0]) - 1 for side in shown_pair.split("  vs  "))
            answers = state["answers"]
            record = {"kind": "vote", "verdict": verdict, "messages": state["messages"], "settings": state["settings"],
                      "left": answers.get(left, answers.get(str(left))), "right": answers.get(right, answers.get(str(right)))}
            said = {"left": f"{record['left']['system']} is better", "right": f"{record['right']['system']} is better",
                    "tie": "a tie", "both_bad": "both bad"}[verdict]
            return save(record, request, f"Saved: {said}.")

        def voter(verdict: str):
            def cast(shown_pair, state, request: gr.Request):
                return vote(verdict, shown_pair, state, request)
            return cast

        for verdict, button in vote_buttons.items():
            button.click(voter(verdict), [pair, compared_state], vote_status, queue=False)  # Arena reads the store when shown

        def contribute(prompt_text, answer_text, system_prompt, request: gr.Request):
            if not (prompt_text or "").strip() or not (answer_text or "").strip():
                return "Write both the prompt and the ideal answer."
            record = {"kind": "contribution", "messages": conversation(system_prompt, [], prompt_text.strip()), "answer": answer_text.strip()}
            return save(record, request, "Saved: thank you, the example is in the next training round's data.")

        contribute_button.click(contribute, [contribute_prompt, contribute_answer, system_prompt], contribute_status, queue=False)
        arena_refresh.click(lambda: arena_markdown(store), None, arena, queue=False)
        arena_tab.select(lambda: arena_markdown(store), None, arena, queue=False)

    app.queue(max_size=experiment.demo.queue_size, default_concurrency_limit=experiment.demo.concurrency, api_open=False)
    return app


def launch(experiment, run, host: str | None = None, port: int | None = None, share: bool = False,
           system_prompt: str | None = None) -> int:
    """Serve the page until Ctrl-C; host/port default to the demo section, share to demo.share."""
    access = decide(experiment.demo, run, host=host, port=port, share=share)
    quiet_gradio(access)
    if not is_loopback(access.host) and access.auth is None:
        print(f"warning: the page on {access.host} answers anyone who can reach it; set {experiment.demo.auth_env}=user:password "
              "to ask for a login", file=sys.stderr)
    systems = Systems(experiment, run, system_prompt="")  # the page sends the prompt its box holds
    app = build_app(experiment, run, systems, system_prompt)
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
