"""The eval harness end to end on a tiny in-process model: answers, cache, report files, baselines."""

from __future__ import annotations

import csv
import json

import pytest

from tuneforge.config import load_experiment
from tuneforge.data.prepare import prepare
from tuneforge.engine.transformers import Engine
from tuneforge.eval.harness import run_eval
from tuneforge.run import RunDir
from tuneforge.systems import LocalSystem, parse


class CountingEngine(Engine):
    """An Engine that counts the prompts it was asked to answer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = 0

    def generate(self, conversations, *args, **kwargs):
        self.prompts += len(conversations)
        return super().generate(conversations, *args, **kwargs)


class TinySystems:
    """Stands in for tuneforge.systems.Systems: each name answers with an in-process tiny model."""

    def __init__(self, engines: dict[str, Engine]):
        self.engines = engines

    def get(self, name):
        return LocalSystem(parse(name), self.engines[name])

    def scorer(self, name):
        return self.engines[name]


def _experiment(tmp_path, body: str, overrides=()):
    path = tmp_path / "exp.yaml"
    path.write_text(body)
    return load_experiment(path, list(overrides))


def _prepared(experiment, tmp_path, tokenizer):
    run = RunDir(experiment, tmp_path / "run")
    prepare(experiment, run, tokenizer=tokenizer, progress=False)
    return run


def test_second_run_with_one_more_system_generates_only_that_one(tmp_path, tiny_llama, tiny_tokenizer, tiny_model_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is the capital of France, question {i}?"},
                {"role": "assistant", "content": f"The capital of France is Paris, answer {i}."},
            ]
        }
        for i in range(12)
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    body = "name: tiny\ndata: {train: chats.jsonl, valid_split: 0.34}\neval: {max_new_tokens: 6}\n"
    merged = f"merged:{tiny_model_dir}"
    first = _experiment(tmp_path, body, ["eval.systems=[base, ngram]"])
    run = _prepared(first, tmp_path, tiny_tokenizer)
    engines = {
        "base": CountingEngine(tiny_llama, tiny_tokenizer, "base"),
        merged: CountingEngine(tiny_llama, tiny_tokenizer, "merged"),
    }
    systems = TinySystems(engines)

    assert run_eval(first, run, systems=systems, progress=False) == 0
    n = len((run.sub("data", "valid.jsonl")).read_text().splitlines())
    assert engines["base"].prompts == n and engines[merged].prompts == 0
    computed = json.loads((run.sub("eval", "metrics.json")).read_text())["base"]["seconds"]
    assert computed > 0

    second = _experiment(tmp_path, body, [f"eval.systems=[base, ngram, '{merged}']"])
    assert run_eval(second, run, systems=systems, progress=False) == 0
    assert engines["base"].prompts == n  # every base answer came from the cache
    assert engines[merged].prompts == n
    # and reports what computing them cost, not the 0 s of reading the cache
    again = json.loads((run.sub("eval", "metrics.json")).read_text())["base"]["seconds"]
    assert again == pytest.approx(computed, abs=0.02)

    folder = run.sub("eval")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) == {"base", "ngram", merged}
    with open(folder / "predictions.csv", newline="") as fh:
        predictions = list(csv.DictReader(fh))
    for name in metrics:
        assert metrics[name]["examples"] == n
        rows = [r for r in predictions if r["system"] == name]
        # the headline numbers are the means of the per-example scores written beside them
        assert metrics[name]["similarity"] == pytest.approx(sum(float(r["similarity"]) for r in rows) / n, abs=1e-3)
        assert metrics[name]["quality"] == pytest.approx(sum(float(r["quality"]) for r in rows) / n, abs=0.05)
        assert metrics[name]["answering"] == pytest.approx(sum(float(r["answering"]) for r in rows) / n, abs=1e-3)
        assert metrics[name]["answering_low"] <= metrics[name]["answering"] <= metrics[name]["answering_high"]
        assert metrics[name]["similarity_low"] <= metrics[name]["similarity"] <= metrics[name]["similarity_high"]
        assert metrics[name]["perplexity"] > 1
    # a random tiny model is no match for the answers' own words
    assert metrics["ngram"]["rouge_l"] > metrics["base"]["rouge_l"]
    assert len(predictions) == 3 * n
    assert {
        "prompt",
        "answer",
        "reference",
        "sources",
        "similarity",
        "answering",
        "rouge_l",
        "bleu",
        "perplexity",
    } <= set(predictions[0])
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64," in html and "Examples" in html
    markdown = (folder / "report.md").read_text()
    assert "| system | similarity | quality | answering |" in markdown and "<th>answering</th>" in html
    # the notes say what quality does not measure, and what answering does
    assert "not whether it answers it; repeating the question scores 100" in markdown
    assert "answering: cosine of the answer with what the reference says beyond the question" in markdown
    assert (folder / "metrics.png").stat().st_size > 1000 and "| ngram |" in (folder / "report.md").read_text()
    cached = sorted(p.name for p in folder.glob("cache/*.jsonl"))
    assert len(cached) == 2 and "base.jsonl" in cached  # one file per model system; baselines are not cached


def test_classification_with_tfidf_beside_a_model(tmp_path, tiny_llama, tiny_tokenizer):
    words = {"positive": "great lovely wonderful", "negative": "awful broken terrible"}
    with open(tmp_path / "reviews.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        for i in range(20):
            label = "positive" if i % 2 else "negative"
            writer.writerow([f"{words[label]} item number {i}", label])
    body = (
        "name: reviews\ndata:\n  train: reviews.csv\n  template: {user: 'Review: {review}', assistant: '{sentiment}'}\n"
        "  label: sentiment\n  valid_split: 0.3\neval: {systems: [base, tfidf, ngram], max_length: 24}\n"
    )
    experiment = _experiment(tmp_path, body)
    run = _prepared(experiment, tmp_path, tiny_tokenizer)
    engine = CountingEngine(tiny_llama, tiny_tokenizer, "base")
    assert run_eval(experiment, run, systems=TinySystems({"base": engine}), progress=False) == 0
    assert engine.prompts == 0  # local systems classify by label likelihood, not by generating

    metrics = json.loads((run.sub("eval", "metrics.json")).read_text())
    assert metrics["tfidf"]["accuracy"] == 1.0 and metrics["tfidf"]["roc_auc"] == 1.0
    for name in ("base", "tfidf", "ngram"):
        m = metrics[name]
        assert 0 <= m["accuracy"] <= 1 and sum(map(sum, m["confusion"])) == m["examples"] == 6
        assert m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"]
    assert (run.sub("eval", "confusion.png")).exists()
    with open(run.sub("eval", "predictions.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"p_positive", "p_negative", "correct", "label"} <= set(rows[0]) and len(rows) == 24  # 4 systems x 6
    # the majority floor is added to every classification eval: always the most common training label
    majority = [r for r in rows if r["system"] == "majority"]
    assert len({r["answer"] for r in majority}) == 1
    share = sum(r["label"] == majority[0]["answer"] for r in majority) / len(majority)
    assert metrics["majority"]["accuracy"] == share


def test_tfidf_without_a_label_is_refused_before_anything_loads(tmp_path):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="tfidf"):
        _experiment(tmp_path, "name: x\ndata: {train: a.jsonl}\neval: {systems: [base, tfidf]}\n")
    with pytest.raises(ConfigError, match="judge must be a model"):
        _experiment(tmp_path, "name: x\neval: {judge: {model: ngram}}\n")


def test_tool_calls_are_scored_by_function_and_arguments():
    from tuneforge.eval.harness import Item, Outcome
    from tuneforge.eval.report import tool_call_scores

    def call(name, **arguments):
        return {"id": "call_x", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}

    want = call("get_weather", city="Paris")
    items = [Item(str(i), [{"role": "user", "content": "q"}], "r", None, reference_calls=[want]) for i in range(4)]
    items.append(Item("plain", [{"role": "user", "content": "q"}], "text answer", None))
    made = [[call("get_weather", city="Paris")], [call("get_weather", city="Rome")], [call("get_time")], None, None]
    scores = tool_call_scores(items, Outcome("s", ["a"] * 5, tool_calls=made))
    assert scores["each"] == ["right", "wrong arguments", "wrong function", "no call", None]
    assert scores["function"] == 0.5 and scores["call"] == 0.25
    # arguments compare as JSON, not as text
    reordered = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"b": 2, "a": 1}'}}
    item = Item(
        "x", [], "r", None, reference_calls=[{**reordered, "function": {"name": "f", "arguments": '{"a":1,"b":2}'}}]
    )
    assert tool_call_scores([item], Outcome("s", ["a"], tool_calls=[[reordered]]))["call"] == 1.0


def test_eval_items_with_tools_generate_with_them_and_report_the_tool_scores(tmp_path, tiny_llama, tiny_tokenizer):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    rows = [
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": f"Weather in city {i}?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"c{i}",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps({"city": str(i)})},
                        }
                    ],
                },
            ],
        }
        for i in range(6)
    ]
    (tmp_path / "tools.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    experiment = _experiment(
        tmp_path,
        "name: tiny\ndata: {train: tools.jsonl, valid_split: 0.5}\neval: {max_new_tokens: 4, systems: [base]}\n",
    )
    run = _prepared(experiment, tmp_path, tiny_tokenizer)
    seen = []

    class Recording(CountingEngine):
        def generate(self, conversations, settings, *args, **kwargs):
            seen.append(settings.tools)
            return super().generate(conversations, settings, *args, **kwargs)

    engine = Recording(tiny_llama, tiny_tokenizer, "base")
    assert run_eval(experiment, run, systems=TinySystems({"base": engine}), progress=False) == 0
    assert seen and all(s == tools for s in seen)  # the eval prompt lists the tools, as training did
    metrics = json.loads(run.sub("eval", "metrics.json").read_text())["base"]
    assert metrics["tool_function"] == 0.0 and metrics["tool_call"] == 0.0  # a random tiny model calls nothing
    rows = list(csv.DictReader(open(run.sub("eval", "predictions.csv"))))
    assert {r["tool_call"] for r in rows} == {"no call"}


class ReferenceJudge:
    """A judge system that prefers the answer which says the reference's facts (it knows the right answers)."""

    def __init__(self, right: list[str]):
        self.right = right

    def generate(self, chats, settings, progress=False):
        from types import SimpleNamespace

        def verdict(chat):
            text = chat[-1]["content"]
            first = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
            return "Verdict: A" if first in self.right else "Verdict: B"

        return [SimpleNamespace(text=verdict(chat)) for chat in chats]


def test_a_judge_pair_says_how_often_each_score_backs_the_judges_winner(tmp_path):
    from types import SimpleNamespace

    from tuneforge.engine.generation import Settings
    from tuneforge.eval import report
    from tuneforge.eval.harness import Item, Outcome, judge_pairs

    support = [  # quickstart eval questions, their references, right answers in other words
        (
            "Which colours is the Kestrel K2 available in?",
            "The K2 comes in three finishes: Graphite, Chalk and Sage.",
            "You can get it in Graphite, Chalk or Sage.",
        ),
        (
            "How much insulation should I strip off each wire before pushing it in?",
            "Strip each wire to 6 mm (1/4 inch) of bare copper, then push it into the terminal.",
            "About a quarter inch (6 mm) of bare copper; push it in until the tab stays down.",
        ),
        (
            "what does it cost to have a pro install it",
            "A Kestrel Install Partner costs a flat $99 per thermostat in the US, including the PA1 if needed.",
            "A professional install by a Kestrel Install Partner is a flat $99, booked in the app.",
        ),
    ]
    items = [Item(str(i), [{"role": "user", "content": q}], r, None) for i, (q, r, _) in enumerate(support)]
    right = [a for _, _, a in support]
    outcomes = [Outcome("echo", [q for q, _, _ in support], [[]] * 3), Outcome("answers", right, [[]] * 3)]
    experiment = _experiment(tmp_path, "name: tiny\ndata: {train: chats.jsonl}\neval: {judge: {model: base}}\n")
    run = RunDir(experiment, tmp_path / "run")
    evaluation = SimpleNamespace(
        labels=None,
        cache_dir=tmp_path,
        systems=SimpleNamespace(get=lambda name: ReferenceJudge(right)),
        progress=False,
        settings=Settings(max_new_tokens=4),
    )
    table, per_example = report.generation_metrics(items, outcomes, 0, experiment.eval.embedder)
    judged = judge_pairs(experiment, run, evaluation, items, outcomes, per_example)

    pair = judged["pairs"][0]
    assert (pair["first"], pair["second"], pair["losses"]) == ("echo", "answers", 3)  # the judge backs every answer
    # echoing the question wins on quality every time, so quality never agrees with the judge; answering always does
    assert pair["agreement"]["quality"] == 0.0 and pair["agreement"]["answering"] == 1.0
    folder = report.write(tmp_path / "eval", items, None, outcomes, table, per_example, judged, experiment)
    markdown = (folder / "report.md").read_text()
    assert "| echo | answers | 0 | 0 | 3 |" in markdown and "quality 0.00, answering 1.00" in markdown


class Oracle:
    """A hosted-style system that answers "Say X" with X: it gets every string_check right."""

    def generate(self, prompts, settings, progress=False):
        from tuneforge.engine.generation import Answer

        return [Answer(p[-1]["content"].removeprefix("Say "), 3, 1, "stop") for p in prompts]


def test_eval_graders_score_every_systems_answers_on_prompts_alone(tmp_path, tiny_llama, tiny_tokenizer):
    """OpenAI's reinforcement lines (a prompt and fields, no reference) are eval data when eval.graders score the
    answers: each grader's mean reward per system with its interval and failures, per example in predictions.csv."""
    rows = [{"messages": [{"role": "user", "content": f"Say w{i}"}], "target": f"w{i}"} for i in range(6)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    match = "{type: string_check, name: match, input: '{{sample.output_text}}', reference: '{{item.target}}', "
    body = (
        "name: tiny\ndata: {train: train.jsonl, valid_split: 0}\n"
        "eval: {data: prompts.jsonl, max_new_tokens: 3, systems: [base, 'openai:oracle'],\n"
        f"       graders: [{match}operation: eq}},\n"
        "                 {type: python, name: broken, source: 'def grade(sample, item): return item[\"nope\"]'}]}\n"
    )
    experiment = _experiment(tmp_path, body)
    run = _prepared(experiment, tmp_path, tiny_tokenizer)
    systems = TinySystems({"base": CountingEngine(tiny_llama, tiny_tokenizer, "base")})
    systems.get = lambda name: Oracle() if name == "openai:oracle" else LocalSystem(parse(name), systems.engines[name])
    assert run_eval(experiment, run, systems=systems, progress=False) == 0

    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    assert metrics["openai:oracle"]["grader_match"] == 1.0 and metrics["base"]["grader_match"] == 0.0
    assert metrics["openai:oracle"]["grader_match_low"] == 1.0 and metrics["base"]["grader_match_errors"] == 0
    assert metrics["base"]["grader_broken"] == 0.0 and metrics["base"]["grader_broken_errors"] == 6
    assert "similarity" not in metrics["base"]  # no reference to compare with
    predictions = list(csv.DictReader(open(run.sub("eval", "predictions.csv"))))
    assert {(r["system"], r["grader_match"]) for r in predictions} == {("base", "0.000"), ("openai:oracle", "1.000")}
    assert "grader_match" in run.sub("eval", "report.md").read_text()
    assert json.loads(run.manifest_path.read_text())["eval"]["mode"] == "graded"


def test_an_eval_grader_is_checked_before_anything_loads(tmp_path):
    from tuneforge.errors import ConfigError
    from tuneforge.eval.harness import check_graders

    body = "name: tiny\neval: {graders: [{type: string_check, name: m, input: x, reference: y, operation: equals}]}\n"
    experiment = _experiment(tmp_path, body)
    with pytest.raises(ConfigError, match=r"exp.yaml: 1 problem\n  - eval.graders\[0\].*operation"):
        run_eval(experiment, RunDir(experiment, tmp_path / "run"), systems=object(), progress=False)
    twice = "{type: string_check, name: m, input: x, reference: y, operation: eq}"
    with pytest.raises(ConfigError, match="a name of its own"):
        check_graders(_experiment(tmp_path, f"name: tiny\neval: {{graders: [{twice}, {twice}]}}\n"))
