"""The terminal chat: Ctrl-C stops the answer being streamed, and the conversation goes on."""

from __future__ import annotations

import io

from tuneforge import chat as chatting
from tuneforge.engine.transformers import Answer


class FakeSystems:
    """Stands in for Systems: the first answer is interrupted after one piece, as Ctrl-C would."""

    def __init__(self, *args, **kwargs):
        self.asked: list[list[dict]] = []
        self.closed = 0
        FakeSystems.last = self

    def get(self, name):
        return self

    def available(self):
        return ["base"]

    def stream(self, messages, settings):
        self.asked.append([dict(m) for m in messages])
        first = len(self.asked) == 1
        try:
            yield "Hel"
            if first:
                raise KeyboardInterrupt  # arrives while the answer is streaming
            yield "lo"
            yield Answer("Hello", 3, 2, "stop")
        finally:
            self.closed += 1


def test_ctrl_c_stops_the_answer_not_the_chat(monkeypatch, tmp_path):
    import tuneforge.systems

    monkeypatch.setattr(tuneforge.systems, "Systems", FakeSystems)
    stdin = io.StringIO("tell me\nand then?\n/exit\n")
    stdout = io.StringIO()
    experiment = type("E", (), {"eval": type("V", (), {"max_new_tokens": 8})(), "seed": 0})()
    assert chatting.chat_loop(experiment, None, "base", stdin=stdin, stdout=stdout, system_prompt="") == 0
    fake = FakeSystems.last
    assert "(answer stopped" in stdout.getvalue()
    assert fake.closed == 2  # the interrupted stream was closed, so its generation ends
    # the second question went out with the history, the stopped answer as far as it was shown
    assert fake.asked[1] == [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "Hel"},
        {"role": "user", "content": "and then?"},
    ]
    assert stdout.getvalue().rstrip().endswith("you>")


class CallingSystems(FakeSystems):
    """The first answer calls a tool; the next one answers from the result the user typed."""

    def stream(self, messages, settings):
        self.asked.append([dict(m) for m in messages])
        self.settings = settings
        if len(self.asked) == 1:
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
            yield "<tool_call>"  # raw text of a call: not shown
            yield Answer("", 5, 9, "tool_calls", tool_calls=[call])
        else:
            yield "It is 21 degrees."
            yield Answer("It is 21 degrees.", 9, 6, "stop")


def test_a_tool_call_in_chat_asks_for_its_result_and_the_model_answers_from_it(monkeypatch):
    import tuneforge.systems

    monkeypatch.setattr(tuneforge.systems, "Systems", CallingSystems)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stdin = io.StringIO('weather in Paris?\n{"temp_c": 21}\n/exit\n')
    stdout = io.StringIO()
    experiment = type("E", (), {"eval": type("V", (), {"max_new_tokens": 8})(), "seed": 0})()
    assert chatting.chat_loop(experiment, None, "base", stdin=stdin, stdout=stdout, system_prompt="", tools=tools) == 0
    fake = CallingSystems.last
    assert fake.settings.tools == tools
    out = stdout.getvalue()
    assert (
        '(tool call) get_weather({"city": "Paris"})' in out and "<tool_call>" not in out and "It is 21 degrees." in out
    )
    second = fake.asked[1]
    assert second[1]["tool_calls"][0]["id"] == "call_1"
    assert second[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
