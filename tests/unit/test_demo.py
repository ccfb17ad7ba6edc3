"""The demo page without a browser: safe launch defaults, streamed replies, the system lists, the page builds."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pydantic
import pytest

from tuneforge.config import Experiment
from tuneforge.demo.access import decide, is_loopback, parse_auth, quiet_gradio
from tuneforge.demo.answers import ask, ask_all, conversation, sources_markdown
from tuneforge.engine.transformers import Answer, Settings
from tuneforge.errors import TuneforgeError
from tuneforge.rag.retriever import Hit
from tuneforge.run import RunDir


def _experiment(**demo) -> Experiment:
    return Experiment(
        name="t",
        data={"label": "label"},
        rag={"corpus": "kb"},
        eval={"systems": ["base", "finetuned+rag", "openai:gpt-4o-mini", "tfidf"]},
        demo=demo,
    )


def _run(tmp_path) -> RunDir:
    run = RunDir(_experiment(), tmp_path / "run")
    (run.path / "adapter").mkdir(parents=True, exist_ok=True)
    (run.path / "config.yaml").write_text("name: t\n")
    return run


# --------------------------------------------------------------------------- access


def test_defaults_are_loopback_no_share_no_files(tmp_path):
    run = _run(tmp_path)
    access = decide(_experiment().demo, run, environ={})
    kwargs = access.launch_kwargs()
    where = (kwargs["server_name"], kwargs["server_port"], kwargs["share"], kwargs["auth"])
    assert where == ("127.0.0.1", 7860, False, None)
    assert kwargs["allowed_paths"] == [] and not kwargs["mcp_server"] and not kwargs["ssr_mode"]
    assert access.cache == (run.path / "demo").resolve()  # Gradio's own files stay in the run
    assert sorted(kwargs["blocked_paths"]) == sorted(str((run.path / n).resolve()) for n in ("adapter", "config.yaml"))
    assert is_loopback(access.host)


def test_flags_override_the_config(tmp_path):
    login = {"TUNEFORGE_DEMO_AUTH": "ann:pw"}
    access = decide(_experiment(host="0.0.0.0", port=9000).demo, _run(tmp_path), environ=login)
    assert (access.host, access.port) == ("0.0.0.0", 9000) and not is_loopback("0.0.0.0")
    access = decide(_experiment(host="0.0.0.0").demo, _run(tmp_path), host="::1", port=8123, environ={})
    assert (access.host, access.port, access.url) == ("::1", 8123, "http://[::1]:8123") and is_loopback("::1")


@pytest.mark.parametrize("from_config", [False, True])
def test_share_without_auth_is_refused(tmp_path, from_config):
    demo = _experiment(share=from_config).demo
    with pytest.raises(TuneforgeError, match="set TUNEFORGE_DEMO_AUTH=user:password"):
        decide(demo, _run(tmp_path), share=not from_config, environ={})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_a_page_beyond_loopback_without_a_login_is_refused(tmp_path, host):
    with pytest.raises(TuneforgeError, match=f"refusing to serve the page on {host} without a login"):
        decide(_experiment().demo, _run(tmp_path), host=host, environ={})
    access = decide(_experiment().demo, _run(tmp_path), host=host, environ={"TUNEFORGE_DEMO_AUTH": "ann:pw"})
    assert access.auth == ("ann", "pw") and not access.typed_systems  # and it offers only the listed systems
    assert decide(_experiment().demo, _run(tmp_path), environ={}).typed_systems


def test_auth_comes_from_the_named_variable(tmp_path):
    demo = _experiment(share=True, auth_env="MY_DEMO_LOGIN").demo
    access = decide(demo, _run(tmp_path), environ={"MY_DEMO_LOGIN": "ann:pa:ss", "TUNEFORGE_DEMO_AUTH": "x:y"})
    assert access.share and access.auth == ("ann", "pa:ss")  # the password may hold a colon
    # auth without share: the local page asks for the login too
    assert decide(_experiment().demo, _run(tmp_path), environ={"TUNEFORGE_DEMO_AUTH": "bob:pw"}).auth == ("bob", "pw")


@pytest.mark.parametrize("value", ["justauser", ":pw", "user:", " :pw"])
def test_malformed_auth_names_the_variable(value):
    with pytest.raises(TuneforgeError, match="TUNEFORGE_DEMO_AUTH must be user:password"):
        parse_auth(value, "TUNEFORGE_DEMO_AUTH")


def test_gradio_is_kept_offline_and_inside_the_run(tmp_path, monkeypatch):
    for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "unset")
    access = decide(_experiment().demo, _run(tmp_path), environ={})
    quiet_gradio(access)
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert os.environ["GRADIO_TEMP_DIR"].startswith(str(access.cache))
    assert os.environ["GRADIO_EXAMPLES_CACHE"].startswith(str(access.cache))


def test_an_unbounded_queue_is_refused():
    with pytest.raises(pydantic.ValidationError) as raised:
        _experiment(queue_size=0)
    # the bound itself, not only the name: a deleted field would be refused too, as an unknown key
    assert [(e["loc"], e["type"]) for e in raised.value.errors()] == [(("demo", "queue_size"), "greater_than")]


# --------------------------------------------------------------------------- answers


class FakeSystem:
    """Streams the words of `text`, then the Answer; records whether the stream was closed."""

    def __init__(self, name: str, text: str, sources=(), fail: bool = False, gate: threading.Event | None = None):
        self.name, self.text, self.sources, self.fail, self.gate = name, text, list(sources), fail, gate
        self.closed = threading.Event()
        self.sent = 0  # words streamed so far

    def stream(self, messages, settings):
        try:
            if self.fail:
                raise TuneforgeError(f"system {self.name!r}: no adapter")
            words = self.text.split(" ")
            for i, word in enumerate(words):
                if self.gate is not None:
                    self.gate.wait(60)  # a bound only against a hang; the test opens the gate at once
                self.sent += 1
                yield word if i == 0 else " " + word
            yield Answer(self.text, 3, len(words), "stop", self.sources)
        finally:
            self.closed.set()


def test_ask_times_the_stream_and_ends_with_the_answer():
    hit = Hit("kb-1", "manual.md", 0.91, "Hold the dial.\n\nFor ten seconds.")
    system = FakeSystem("base+rag", "Hold the dial", [hit])
    snapshots = [
        (r.text, r.first_token_s is not None, r.done) for r in ask({"base+rag": system}.get, "base+rag", [], Settings())
    ]
    assert snapshots[0] == ("", False, False)  # shown while the model loads
    assert [s[0] for s in snapshots[1:]] == ["Hold", "Hold the", "Hold the dial", "Hold the dial"]
    assert snapshots[-1][1:] == (True, True)
    reply = list(ask({"x": system}.get, "x", [], Settings()))[-1]
    assert reply.answer.sources == [hit] and "3 tokens" in reply.summary() and "first token" in reply.summary()
    text = sources_markdown(reply.answer.sources)
    assert "**1. manual.md** · score 0.91" in text and "> Hold the dial.\n>\n> For ten seconds." in text


def test_ask_all_streams_every_system_and_keeps_going_past_a_broken_one():
    systems = {
        "a": FakeSystem("a", "one two"),
        "b": FakeSystem("b", "", fail=True),
        "c": FakeSystem("c", "three four five"),
    }
    rounds = list(ask_all(systems.get, ["a", "b", "c"], [], Settings()))
    last = rounds[-1]
    assert [r.system for r in last] == ["a", "b", "c"]
    assert last[0].text == "one two" and last[2].text == "three four five"
    assert last[1].error == "system 'b': no adapter" and "error" in last[1].summary()


def test_closing_ask_all_stops_the_streams():
    gate = threading.Event()
    systems = {"a": FakeSystem("a", " ".join("w" * 50), gate=gate), "b": FakeSystem("b", " ".join("v" * 50), gate=gate)}
    rounds = ask_all(systems.get, ["a", "b"], [], Settings())
    next(rounds)
    rounds.close()  # the page cancelled, or the browser went away
    gate.set()
    # 60 s only matters on a hang; the streams stop at their next word
    assert systems["a"].closed.wait(60) and systems["b"].closed.wait(60)
    # a stream that ran to its end closes too: stopped means it never sent all its words
    assert systems["a"].sent < 50 and systems["b"].sent < 50


def test_conversation_puts_the_preset_first():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert conversation("  ", history, "next") == [*history, {"role": "user", "content": "next"}]
    assert conversation("Be brief.", [], "q")[0] == {"role": "system", "content": "Be brief."}


# --------------------------------------------------------------------------- the page


class FakeSystems:
    def __init__(self, names):
        self.names = names

    def available(self):
        return list(self.names)

    def get(self, name):
        raise AssertionError("building the page must not load a model")


def test_system_lists_and_compare_defaults():
    from tuneforge.demo.app import compare_defaults, system_choices

    experiment = _experiment()
    names = system_choices(experiment, FakeSystems(["base", "base+rag"]))
    # finetuned+rag waits for an adapter; tfidf is no chat system
    assert names == ["base", "base+rag", "openai:gpt-4o-mini"]
    assert compare_defaults(experiment, names) == ["base", "openai:gpt-4o-mini"]  # eval's systems, in eval's order
    assert compare_defaults(experiment, ["base", "base+rag"]) == ["base", "base+rag"]  # topped up to two
    trained = system_choices(experiment, FakeSystems(["base", "finetuned", "base+rag", "finetuned+rag"]))
    assert compare_defaults(experiment, trained) == ["base", "finetuned+rag", "openai:gpt-4o-mini"]


def test_the_page_builds_with_presets_and_a_bounded_queue(tmp_path):
    from tuneforge.demo.app import build_app

    experiment = _experiment(presets={"short poem": "Answer with a four-line poem."}, queue_size=5)
    app = build_app(experiment, _run(tmp_path), FakeSystems(["base", "base+rag"]))
    config = app.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"chatbot", "message", "system", "preset", "compare-systems", "compare-0", "compare-3"} <= ids
    preset = next(c for c in config["components"] if c["props"].get("elem_id") == "preset")
    assert [choice[0] for choice in preset["props"]["choices"]] == ["(none)", "short poem"]
    assert app._queue.max_size == 5


NEWEST = {
    "messages": [{"role": "user", "content": "hi"}],
    "settings": {"temperature": 0.0, "max_tokens": 8},
    "answer": {"system": "base", "identity": "builtin:x", "text": "hello", "sources": []},
}


def _page(tmp_path):
    from tuneforge.demo.app import Page
    from tuneforge.feedback.store import FeedbackStore

    return Page(FakeSystems(["base", "base+rag"]), FeedbackStore(_run(tmp_path).sub("feedback")))


def test_feedback_from_a_logged_in_page_records_who_gave_it(tmp_path):
    from tuneforge.demo.app import corrected, thumb

    page, ana = _page(tmp_path), SimpleNamespace(username="ana")
    assert thumb(page, "down", None, ana).startswith("Ask something first")  # nothing to judge yet
    assert thumb(page, "down", NEWEST, ana).startswith("Saved: thumbs down for base")
    assert corrected(page, "hello", NEWEST, ana).startswith("Edit the answer first")  # unchanged text
    assert corrected(page, "Hello! How can I help?", NEWEST, ana).startswith("Saved: your better answer")
    records, _ = page.store.read()
    assert [(r["kind"], r["login"]) for r in records] == [("thumb", "ana"), ("correction", "ana")]
    assert records[1]["corrected"] == "Hello! How can I help?" and records[1]["answer"]["text"] == "hello"


def test_a_vote_names_the_pair_on_screen_and_a_contribution_keeps_the_system_prompt(tmp_path):
    from tuneforge.demo.app import contribute, vote

    page, bob = _page(tmp_path), SimpleNamespace(username="bob")
    other = {**NEWEST["answer"], "system": "base+rag", "text": "hello there"}
    state = {"messages": NEWEST["messages"], "settings": NEWEST["settings"], "answers": {0: NEWEST["answer"], 1: other}}
    assert vote(page, "left", None, state, bob).startswith("Compare two systems first")
    assert vote(page, "right", "1. base  vs  2. base+rag", state, bob) == "Saved: base+rag is better."
    assert contribute(page, "q", "  ", "Be brief.", bob).startswith("Write both")
    assert contribute(page, " q ", " a ", "Be brief.", None).startswith("Saved: thank you")
    (voted, contributed), _ = page.store.read()
    assert (voted["verdict"], voted["login"]) == ("right", "bob")
    assert (voted["left"]["system"], voted["right"]["system"]) == ("base", "base+rag")
    assert contributed["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert (contributed["answer"], contributed["login"]) == ("a", None)


class AnsweringSystems(FakeSystems):
    def __init__(self, answers: dict[str, str]):
        super().__init__(list(answers))
        self.answers = answers

    def get(self, name):
        return FakeSystem(name, self.answers[name])

    def identity(self, name):
        return f"builtin:{name}"


def test_compare_opens_the_votes_on_the_first_pair_once_every_answer_is_in(tmp_path):
    from tuneforge.demo.app import COMPARE_MAX, Page, compare
    from tuneforge.feedback.store import FeedbackStore

    page = Page(AnsweringSystems({"base": "one two", "base+rag": "three"}), FeedbackStore(tmp_path / "feedback"))
    updates = list(compare(page, " q ", ["base", "base+rag", "base"], "", 0.0, 8))
    votes = slice(COMPARE_MAX + 2, None)
    assert all(u["interactive"] is False for update in updates[:-1] for u in update[votes])  # closed while streaming
    *columns, state, pair = updates[-1][: COMPARE_MAX + 2]
    assert [c["visible"] for c in columns] == [True, True, False, False]  # the repeated name counts once
    assert columns[0]["value"].startswith("#### base\n\none two") and "done in" in columns[1]["value"]
    assert pair["choices"] == ["1. base  vs  2. base+rag"] and pair["value"] == "1. base  vs  2. base+rag"
    assert all(u["interactive"] is True for u in updates[-1][votes])
    assert state["answers"][1] == {"system": "base+rag", "identity": "builtin:base+rag", "text": "three", "sources": []}
    assert state["settings"] == {"temperature": 0.0, "max_tokens": 8}


def test_the_page_hands_the_login_to_every_feedback_handler(tmp_path):
    """Gradio passes the login only to a parameter it sees typed gr.Request; the wired handlers must show it that."""
    from gradio.helpers import special_args

    from tuneforge.demo.app import build_app

    app = build_app(_experiment(), _run(tmp_path), FakeSystems(["base", "base+rag"]))
    said = {"chat-feedback", "vote-status", "contribute-status"}  # where each feedback handler answers
    feedback = [block for block in app.fns.values() if {c.elem_id for c in block.outputs} & said]
    assert len(feedback) == 8  # two thumbs, the correction, four votes, the contribution
    login = SimpleNamespace(username="ana")
    for block in feedback:
        given = ["x"] * len(block.inputs)
        assert special_args(block.fn, list(given), request=login)[0] == [*given, login], block.outputs


def test_beyond_loopback_a_typed_adapter_folder_or_openai_model_is_refused(tmp_path):
    import gradio as gr

    from tuneforge.demo.app import COMPARE_MAX, Page, chat, compare
    from tuneforge.feedback.store import FeedbackStore

    systems = AnsweringSystems({"base": "one", "openai:gpt-4o-mini": "hosted", "adapter:/srv/other/adapter": "x"})
    listed = frozenset({"base", "openai:gpt-4o-mini"})  # the run's and the experiment's eval.systems
    page = Page(systems, FeedbackStore(tmp_path / "feedback"), listed)
    for typed in ("adapter:/srv/other/adapter", "openai:gpt-5"):
        with pytest.raises(gr.Error, match="not one of this page's systems"):
            list(chat(page, "hi", typed, "", 0.0, 8, [], []))
    columns = list(compare(page, "hi", ["base", "adapter:/srv/other/adapter"], "", 0.0, 8))[-1][:COMPARE_MAX]
    assert "not one of this page's systems" in columns[1]["value"] and "one" in columns[0]["value"]
    assert list(chat(page, "hi", "openai:gpt-4o-mini", "", 0.0, 8, [], []))[-1][0][-1]["content"] == "hosted"
    anything = Page(systems, FeedbackStore(tmp_path / "feedback"))  # loopback: the user's own machine
    assert list(chat(anything, "hi", "adapter:/srv/other/adapter", "", 0.0, 8, [], []))[-1][0][-1]["content"] == "x"


def test_the_page_answers_its_own_host_names_only_and_refuses_posts_from_other_sites(tmp_path):
    import socket

    import httpx

    from tuneforge.demo.app import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    access = decide(_experiment().demo, _run(tmp_path), port=port, environ={}, allowed_hosts=("demo.example",))
    app = build_app(_experiment(), _run(tmp_path), FakeSystems(["base"]))
    app.launch(prevent_thread_lock=True, **access.launch_kwargs())
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url).status_code == 200
        assert httpx.get(url, headers={"Host": "demo.example"}).status_code == 200  # --allowed-host
        rebound = httpx.get(url, headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        posted = httpx.post(f"{url}/gradio_api/queue/join", json={}, headers={"Origin": "http://evil.example"})
        assert posted.status_code == 403 and posted.json()["error"]["code"] == "cross_origin"
        own = httpx.post(f"{url}/gradio_api/queue/join", json={}, headers={"Origin": url})
        assert own.status_code not in (400, 403)  # past the guard (Gradio itself answers the empty body)
    finally:
        app.close()
