"""OpenAI-format graders (#32 item 2): each grader type, the templating, the multi formula, the python sandbox's
limits, validation by field path, and the graders/run response checked against the openai package's type."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from tuneforge.engine.generation import Answer
from tuneforge.graders import (
    KINDS,
    GraderError,
    InvalidGrader,
    Limits,
    formula,
    grade,
    run_grader,
    run_response,
    sandbox,
    validate_grader,
    validate_response,
)
from tuneforge.graders import similarity as metrics
from tuneforge.graders.sandbox import network_namespace

openai_types = pytest.importorskip("openai.types.fine_tuning.alpha")

FAST = Limits(seconds=3, disk_bytes=8 * 1024**2)  # a runaway grader is stopped in seconds, not OpenAI's 2 minutes


def check(operation: str, reference: str = "{{item.label}}") -> dict:
    return {
        "type": "string_check",
        "name": "label",
        "input": "{{sample.output_text}}",
        "reference": reference,
        "operation": operation,
    }


def similar(metric: str) -> dict:
    return {
        "type": "text_similarity",
        "name": "close",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
    }


def python(source: str) -> dict:
    return {"type": "python", "name": "code", "source": source}


# string_check


@pytest.mark.parametrize(
    "operation, answer, label, score",
    [
        ("eq", "positive", "positive", 1.0),
        ("eq", "Positive", "positive", 0.0),  # eq is exact, as OpenAI's
        ("ne", "negative", "positive", 1.0),
        ("ne", "positive", "positive", 0.0),
        ("like", "it is positive.", "positive", 1.0),
        ("like", "it is Positive.", "positive", 0.0),
        ("ilike", "it is POSITIVE.", "positive", 1.0),
        ("ilike", "it is negative.", "positive", 0.0),
    ],
)
def test_string_check_operations(operation, answer, label, score):
    result = grade(check(operation), answer, {"label": label})
    assert (result.score, result.errors) == (score, {})


# text_similarity


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_5", "rouge_l"])
def test_text_similarity_is_one_for_the_reference_zero_for_unrelated_and_between_for_near(metric):
    reference = "the quick brown fox jumps over the lazy dog"
    same = grade(similar(metric), reference, {"answer": reference}).score
    near = grade(similar(metric), "the quick brown fox jumps over a sleepy dog", {"answer": reference}).score
    far = grade(similar(metric), "zzz qqq", {"answer": reference}).score
    assert same == pytest.approx(1.0, abs=1e-3)  # METEOR's fragmentation penalty leaves 1 - 0.5/9^3
    assert 0.0 < near < same
    assert far < near and (far == 0.0 or metric == "fuzzy_match")


@pytest.mark.slow  # importing nltk and sacrebleu takes seconds
@pytest.mark.parametrize(
    "answer, reference",
    [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("a quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog"),
        ("hello", "hello world"),
        ("completely different words", "nothing in common here"),
    ],
)
def test_bleu_gleu_and_rouge_agree_with_the_reference_packages(answer, reference):
    """On lowercase words, the hand-written metrics give sacreBLEU's, nltk's GLEU and rouge_score's numbers."""
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    gleu_score = pytest.importorskip("nltk.translate.gleu_score")
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(reference, answer)
    assert metrics.bleu(answer, reference) == pytest.approx(sacrebleu.sentence_bleu(answer, [reference]).score / 100)
    nltk_gleu = gleu_score.sentence_gleu([reference.split()], answer.split())
    assert metrics.gleu(answer, reference) == pytest.approx(nltk_gleu)
    assert metrics.rouge_n(answer, reference, 1) == pytest.approx(rouge["rouge1"].fmeasure)
    assert metrics.rouge_n(answer, reference, 2) == pytest.approx(rouge["rouge2"].fmeasure)
    assert metrics.rouge_l(answer, reference) == pytest.approx(rouge["rougeL"].fmeasure)


def test_metric_values_worked_by_hand():
    """'the cat sat on the mat' against 'the cat is on the mat': 1- to 4-grams matched 5/6, 3/5, 1/4 and 0/3."""
    answer, reference = "the cat sat on the mat", "the cat is on the mat"
    # BLEU: the empty 4-gram order counts 1 / (2 * 3) (sacreBLEU's exp smoothing); equal lengths, no brevity penalty
    assert metrics.bleu(answer, reference) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** (1 / 4))
    # METEOR: 5 of 6 words match each way, in 2 chunks (the cat | on the mat)
    assert metrics.meteor(answer, reference) == pytest.approx(5 / 6 * (1 - 0.5 * (2 / 5) ** 3))
    # GLEU is the smaller of n-gram precision and recall: 'hello' finds 1 of the reference's 3 n-grams
    assert metrics.gleu("hello", "hello world") == pytest.approx(1 / 3)
    assert metrics.gleu(answer, reference) == pytest.approx(9 / 18)


class Embeds:
    """An embedder that maps a few words to fixed unit vectors."""

    vectors = {"up": [1.0, 0.0], "tilted": [0.6, 0.8], "down": [-1.0, 0.0]}

    def encode(self, texts):
        return np.array([self.vectors[t] for t in texts])


def test_cosine_uses_the_given_embedder_and_reads_below_zero_as_zero():
    def cosine(answer, reference):
        return grade(similar("cosine"), answer, {"answer": reference}, embedder=Embeds()).score

    assert cosine("up", "up") == pytest.approx(1.0)
    assert cosine("tilted", "up") == pytest.approx(0.6)
    assert cosine("down", "up") == 0.0


@pytest.mark.slow
def test_cosine_with_the_builtin_embedder_ranks_a_paraphrase_above_an_unrelated_answer():
    pytest.importorskip("sentence_transformers")
    reference = {"answer": "The parcel arrives within three working days."}
    paraphrase = grade(similar("cosine"), "Delivery takes up to three business days.", reference)
    unrelated = grade(similar("cosine"), "Bananas are rich in potassium.", reference)
    assert paraphrase.errors == unrelated.errors == {}
    assert 0.0 <= unrelated.score < paraphrase.score <= 1.0


# templating


def test_templates_read_nested_item_fields_list_indices_and_the_sample_as_json():
    grader = check("eq", reference="{{ item.expected.labels.1 }}/{{item.count}}/{{item.flag}}")
    grader["input"] = "{{sample.output_json.label}}/{{sample.output_json.n}}/{{sample.output_json.ok}}"
    item = {"expected": {"labels": ["neutral", "positive"]}, "count": 2, "flag": True}
    assert grade(grader, '{"label": "positive", "n": 2, "ok": true}', item).score == 1.0
    assert grade(grader, '{"label": "negative", "n": 2, "ok": true}', item).score == 0.0


def test_a_value_that_is_not_a_string_is_written_as_json():
    grader = check("eq", reference='2|true|null|["a", "b"]|{"k": "é"}')
    grader["input"] = "{{item.n}}|{{item.flag}}|{{item.none}}|{{item.tags}}|{{item.map}}"
    item = {"n": 2, "flag": True, "none": None, "tags": ["a", "b"], "map": {"k": "é"}}
    assert grade(grader, "x", item).score == 1.0


def test_a_missing_reference_fails_the_grade_naming_the_path():
    result = grade(check("eq", reference="{{item.expected.label}}"), "positive", {"expected": {"lable": "positive"}})
    assert result.score == 0.0
    assert list(result.errors) == ["invalid_variable_error"]
    assert "item.expected has no 'label'" in result.error


def test_output_json_of_an_answer_that_is_not_json_is_a_sample_parse_error():
    grader = check("eq", reference="positive")
    grader["input"] = "{{sample.output_json.label}}"
    result = grade(grader, "positive, I think", {})
    assert (result.score, list(result.errors)) == (0.0, ["sample_parse_error"])


def test_a_reference_outside_item_and_sample_is_refused_when_validated():
    with pytest.raises(InvalidGrader, match=r"reference: \{\{answer\}\} must start with item. or sample."):
        validate_grader(check("eq", reference="{{answer}}"))


# score_model and label_model


def scorer(range_=None) -> dict:
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "judge-model",
        "input": [
            {"role": "system", "content": "Grade the answer."},
            {"role": "user", "content": "Question: {{item.question}}\nAnswer: {{sample.output_text}}"},
        ],
    }
    return grader if range_ is None else {**grader, "range": range_}


def labeller() -> dict:
    return {
        "type": "label_model",
        "name": "sentiment",
        "model": "judge-model",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Label: {{sample.output_text}}"}]}],
        "labels": ["positive", "negative", "neutral"],
        "passing_labels": ["positive"],
    }


def replying(text: str, seen: list | None = None):
    def model(messages):
        if seen is not None:
            seen.append(messages)
        return text

    return model


def test_score_model_renders_its_messages_and_reads_the_score():
    seen: list = []
    result = grade(scorer(), "Paris", {"question": "Capital of France?"}, model=replying('{"result": 0.75}', seen))
    assert (result.score, result.errors) == (0.75, {})
    (messages,) = seen
    assert messages[0] == {"role": "system", "content": "Grade the answer."}
    assert messages[1]["content"].startswith("Question: Capital of France?\nAnswer: Paris")
    assert '"result"' in messages[1]["content"]  # the reply's form is asked for in words


@pytest.mark.parametrize(
    "reply, range_, score, error",
    [
        ("8", [1, 10], 8.0, None),
        ('```json\n{"score": 3}\n```', [1, 10], 3.0, None),
        ("Score: 0.5", None, 0.5, None),
        ("0.5 or maybe 0.7", None, 0.0, "model_grader_parse_error"),  # two numbers: no guess
        ("great answer!", None, 0.0, "model_grader_parse_error"),
        ('{"result": 1.5}', None, 0.0, "model_grader_parse_error"),  # outside the default [0, 1]
        ('{"result": "high"}', None, 0.0, "model_grader_parse_error"),
    ],
)
def test_score_model_replies_that_parse_and_that_do_not(reply, range_, score, error):
    result = grade(scorer(range_), "Paris", {"question": "q"}, model=replying(reply))
    assert result.score == score
    assert list(result.errors) == ([error] if error else [])


def test_a_failing_grader_model_is_a_server_error_and_a_missing_one_too():
    def broken(messages):
        raise ConnectionError("refused")

    result = grade(scorer(), "Paris", {"question": "q"}, model=broken)
    assert (result.score, list(result.errors)) == (0.0, ["model_grader_server_error"])
    assert "refused" in result.error
    assert list(grade(scorer(), "Paris", {"question": "q"}).errors) == ["model_grader_server_error"]


@pytest.mark.parametrize(
    "reply, score, error",
    [
        ("positive", 1.0, None),
        ('{"result": "Positive"}', 1.0, None),
        ("The review is negative.", 0.0, None),
        ("positive or negative", 0.0, "model_grader_parse_error"),
        ("mixed", 0.0, "model_grader_parse_error"),
    ],
)
def test_label_model_passes_only_the_passing_labels(reply, score, error):
    result = grade(labeller(), "I loved it", {}, model=replying(reply))
    assert result.score == score
    assert list(result.errors) == ([error] if error else [])


class FakeSystem:
    """A tuneforge system as `Systems.get` returns it: generate(conversations, settings) -> answers."""

    def __init__(self, text: str):
        self.text, self.calls = text, []

    def generate(self, conversations, settings, batch_size=16, progress=False):
        self.calls.append((conversations, settings))
        return [Answer(self.text, 40, 5, "stop") for _ in conversations]


def test_a_system_answers_with_the_graders_sampling_params_and_its_tokens_are_counted():
    labels = FakeSystem("negative")
    result = grade(labeller(), "meh", {}, model={"judge-model": labels})  # a mapping picks by the grader's model
    assert (result.score, result.tokens) == (0.0, {"judge-model": (40, 5)})
    scores = FakeSystem("0.9")
    sampling = {"temperature": 0.2, "max_completions_tokens": 64, "seed": 7}
    result = grade({**scorer(), "sampling_params": sampling}, "Paris", {"question": "q"}, model=scores)
    assert result.score == 0.9
    settings = scores.calls[0][1]
    assert (settings.temperature, settings.max_new_tokens, settings.seed) == (0.2, 64, 7)


# multi


def multi(formula: str) -> dict:
    return {
        "type": "multi",
        "name": "total",
        "graders": {"label": check("eq"), "close": similar("rouge_1")},
        "calculate_output": formula,
    }


CLOSE = 2 / 3  # rouge_1 of "positive review" against "positive": precision 1/2, recall 1


@pytest.mark.parametrize(
    "formula, score",
    [
        ("(label + close) / 2", (1 + CLOSE) / 2),
        ("0.9 * label + 0.1 * close", 0.9 + 0.1 * CLOSE),
        ("max(label, close) - min(label, close)", 1 - CLOSE),
        ("sqrt(close) ^ 2 + abs(-label) - floor(0.5) + ceil(0.2)", CLOSE + 2),  # ^ is a power, as OpenAI writes it
        ("exp(log(close)) ** 2", CLOSE**2),
        ("-label * 3", -3.0),
    ],
)
def test_multi_computes_its_formula_over_the_sub_graders(formula, score):
    result = grade(multi(formula), "positive review", {"label": "positive review", "answer": "positive"})
    assert result.errors == {}
    assert result.sub_scores == {"label": 1.0, "close": pytest.approx(CLOSE)}
    assert result.score == pytest.approx(score)


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('true')",
        "label.__class__",
        "label[0]",
        "(lambda: 1)()",
        "max(label, key=close)",
        "'label'",
        "label if close else 1",
        "label < close",
        "open('x')",
    ],
)
def test_a_formula_with_anything_but_arithmetic_is_refused(formula):
    with pytest.raises(InvalidGrader, match="calculate_output"):
        validate_grader(multi(formula))


def test_a_formula_naming_no_sub_grader_is_refused():
    with pytest.raises(InvalidGrader, match="calculate_output: names no sub-grader: lable"):
        validate_grader(multi("lable + close"))


def test_a_formula_that_cannot_be_computed_fails_the_grade_and_a_failed_sub_grader_counts_zero():
    result = grade(multi("label / (close - close)"), "good", {"label": "good", "answer": "good"})
    assert (result.score, list(result.errors)) == (0.0, ["other_error"])
    result = grade(multi("label + close"), "good", {"answer": "good"})  # item has no label: that grader fails
    assert result.sub_scores == {"label": 0.0, "close": 1.0}
    assert result.score == 1.0 and list(result.errors) == ["invalid_variable_error"]


def test_a_formula_computed_without_validation_still_names_an_unknown_variable():
    with pytest.raises(GraderError, match="names no sub-grader: b") as caught:
        formula.evaluate("a + b", {"a": 1.0})
    assert caught.value.kind == "invalid_variable_error"


def test_multi_takes_the_openai_packages_one_grader_form():
    grader = {"type": "multi", "name": "m", "graders": check("eq"), "calculate_output": "2 * label"}
    assert grade(grader, "x", {"label": "x"}).score == 2.0


# python, in its sandbox


def test_a_python_grader_scores_from_the_sample_and_the_item():
    source = (
        "def grade(sample, item):\n"
        "    guess = sample['output_json']['answer']\n"
        "    return 1.0 if guess == item['answer'] else 0.25 if sample['output_text'] else 0.0\n"
    )
    assert grade(python(source), '{"answer": 42}', {"answer": 42}, limits=FAST).score == 1.0
    assert grade(python(source), '{"answer": 41}', {"answer": 42}, limits=FAST).score == 0.25


def test_a_python_grader_runs_in_an_empty_folder_and_its_prints_do_not_count():
    source = (
        "import os\n"
        "def grade(sample, item):\n"
        "    print('{\"score\": 9}')\n"  # what a reply looks like, on the grader's own stdout
        "    return float(len(os.listdir('.')))\n"
    )
    result = grade(python(source), "x", {}, limits=FAST)
    assert (result.score, result.errors) == (0.0, {})


def test_a_python_grader_that_raises_fails_with_its_error():
    result = grade(python("def grade(sample, item):\n    return item['missing']\n"), "x", {}, limits=FAST)
    assert (result.score, list(result.errors)) == (0.0, ["python_grader_runtime_error"])
    assert "KeyError: 'missing'" in result.error
    bad = grade(python("def grade(sample, item):\n    return 'high'\n"), "x", {}, limits=FAST)
    assert list(bad.errors) == ["python_grader_runtime_error"]


@pytest.mark.parametrize(
    "body, kind",
    [
        ("    while True:\n        pass\n", "unresponsive_reward_error"),
        ("    import time\n    time.sleep(60)\n", "unresponsive_reward_error"),
        ("    blob = bytearray(4 * 1024**3)\n    return 1.0\n", "python_grader_runtime_error"),
        (
            "    with open('huge', 'wb') as f:\n        for _ in range(64):\n            f.write(b'x' * 2**20)\n"
            "    return 1.0\n",
            "python_grader_runtime_error",
        ),
        ("    import os\n    os._exit(0)\n", "python_grader_server_error"),
    ],
    ids=["loops", "sleeps", "allocates-4GB", "writes-64MB", "exits"],
)
def test_a_python_grader_past_its_limits_is_stopped_and_fails(body, kind):
    started = time.monotonic()
    result = grade(python(f"def grade(sample, item):\n{body}"), "x", {}, limits=FAST)
    assert time.monotonic() - started < FAST.seconds + 2
    assert (result.score, list(result.errors)) == (0.0, [kind])


def test_a_grader_whose_cpu_time_runs_out_before_the_wall_clock_is_unresponsive_too():
    # On a quiet machine a busy loop can reach RLIMIT_CPU (SIGXCPU) before the wall clock: same limit, same kind.
    # Wall clock well past the CPU limit, so only the CPU limit can stop it.
    source = "def grade(sample, item):\n    while True:\n        pass\n"
    result = grade(python(source), "x", {}, limits=Limits(seconds=30, cpu_seconds=1, disk_bytes=FAST.disk_bytes))
    assert (result.score, list(result.errors)) == (0.0, ["unresponsive_reward_error"])


@pytest.fixture
def listener():
    """A TCP server on localhost that records whether anything connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    connected = threading.Event()
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                server.accept()[0].close()
                connected.set()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize(
    "connect",
    [
        "import socket\n    socket.create_connection(('127.0.0.1', PORT), timeout=1)",
        "import socket\n    socket.socket().connect(('127.0.0.1', PORT))",
        # around the refused socket class: a fresh _socket module, only the network namespace stops it
        "import sys, importlib\n    sys.modules.pop('_socket')\n    raw = importlib.import_module('_socket')\n"
        "    s = raw.socket(2, 1)\n    s.settimeout(1)\n    s.connect(('127.0.0.1', PORT))",
    ],
    ids=["create_connection", "socket", "fresh-_socket"],
)
def test_a_python_grader_cannot_reach_the_network(listener, connect):
    port, connected = listener
    if "fresh" in connect and not network_namespace():
        pytest.skip("this kernel gives no network namespace; sockets are refused only in-process")
    source = f"def grade(sample, item):\n    {connect.replace('PORT', str(port))}\n    return 1.0\n"
    result = grade(python(source), "x", {}, limits=FAST)
    assert (result.score, list(result.errors)) == (0.0, ["python_grader_runtime_error"])
    time.sleep(0.3)
    assert not connected.is_set()


def test_sockets_are_refused_inside_the_process_where_there_is_no_network_namespace(listener, monkeypatch):
    port, connected = listener
    monkeypatch.setattr(sandbox, "network_namespace", lambda: ())
    source = f"import socket\ndef grade(sample, item):\n    socket.socket().connect(('127.0.0.1', {port}))\n"
    result = grade(python(source), "x", {}, limits=FAST)
    assert "network access is disabled" in result.errors["python_grader_runtime_error"]
    time.sleep(0.3)
    assert not connected.is_set()


def test_a_python_source_over_the_limit_or_without_grade_is_refused():
    with pytest.raises(InvalidGrader, match="source: defines no grade"):
        validate_grader(python("def score(sample, item):\n    return 1\n"))
    with pytest.raises(InvalidGrader, match="source: not Python"):
        validate_grader(python("def grade(:\n"))
    long = "def grade(sample, item):\n    return 1\n" + "#" * 300_000
    with pytest.raises(InvalidGrader, match="over the 262144"):
        validate_grader(python(long))


# validation


def test_validation_names_every_bad_field_at_once():
    grader = {**check("contains"), "refrence": "x"}
    del grader["reference"]
    with pytest.raises(InvalidGrader) as caught:
        validate_grader(grader)
    assert sorted(caught.value.problems) == [
        "operation: Input should be 'eq', 'ne', 'like' or 'ilike'",
        "reference: Field required",
        "refrence: no such field in a string_check grader",
    ]


@pytest.mark.parametrize(
    "grader, problem",
    [
        ({"type": "regex", "name": "x"}, "type: 'regex' is not one of"),
        ({**scorer(), "range": [1, 0]}, "range: must be two increasing numbers"),
        ({**labeller(), "passing_labels": ["great"]}, "passing_labels: 'great' is not among labels"),
        ({**similar("cosine"), "evaluation_metric": "jaccard"}, "evaluation_metric: Input should be"),
        (
            {**scorer(), "input": [{"role": "user", "content": {"type": "input_image", "image_url": "http://x"}}]},
            "input.0.content: only text content is taken",
        ),
        ({**scorer(), "input": [{"role": "judge", "content": "x"}]}, "input.0.role: Input should be"),
        ({**scorer(), "input": [{"role": "user", "content": 3}]}, "input.0.content: matches none of the forms"),
        ({**multi("label"), "graders": {"inner": multi("label")}}, "graders.inner.type: 'multi' is not one of"),
        ({**multi("label"), "graders": {"label": {**check("eq"), "operation": "is"}}}, "graders.label.operation"),
    ],
)
def test_validation_refuses_what_a_grader_cannot_mean(grader, problem):
    with pytest.raises(InvalidGrader, match=problem.replace("[", r"\[").replace(".", r"\.")):
        validate_grader(grader)


# batches and the graders/run response


def test_run_grader_grades_a_batch_in_order_and_counts_errors():
    items = [{"label": "positive"}, {"label": "negative"}, {}]
    results = run_grader(check("eq"), ["positive", "positive", "positive"], items)
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert [list(r.errors) for r in results] == [[], [], ["invalid_variable_error"]]
    with pytest.raises(ValueError, match="2 samples but 3 items"):
        run_grader(check("eq"), ["a", "b"], items)


def test_the_error_kinds_are_the_flags_of_openais_response():
    fields = openai_types.grader_run_response.MetadataErrors.model_fields
    flags = {info.alias or name for name, info in fields.items() if info.annotation is bool}
    assert flags == set(KINDS)


def _aliases(model) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def test_the_run_response_is_openais_graders_run_response():
    graders = {"judge": scorer(), "code": python("def grade(sample, item):\n    return item['missing']\n")}
    grader = {"type": "multi", "name": "total", "graders": graders, "calculate_output": "judge + code"}
    result = grade(grader, "Paris", {"question": "q"}, model={"judge-model": FakeSystem("0.5")}, limits=FAST)
    body = json.loads(json.dumps(run_response(result)))  # what goes over the wire
    parsed = openai_types.GraderRunResponse.model_validate(body)
    assert set(body) == _aliases(openai_types.GraderRunResponse)  # nothing the type lacks, nothing missing
    assert set(body["metadata"]) == _aliases(openai_types.grader_run_response.Metadata)
    assert set(body["metadata"]["errors"]) == _aliases(openai_types.grader_run_response.MetadataErrors)
    assert parsed.reward == 0.5 and parsed.sub_rewards == {"judge": 0.5, "code": 0.0}
    assert parsed.metadata.errors.python_grader_runtime_error is True
    assert "KeyError" in parsed.metadata.errors.python_grader_runtime_error_details
    assert parsed.metadata.errors.api_model_grader_parse_error is False
    assert parsed.metadata.token_usage == 45
    assert body["model_grader_token_usage_per_model"]["judge-model"]["total_tokens"] == 45
    assert parsed.metadata.execution_time > 0


def test_the_validate_response_is_openais_and_round_trips():
    body = validate_response(check("ilike"))
    parsed = openai_types.GraderValidateResponse.model_validate(body)
    assert parsed.grader.operation == "ilike"
    assert validate_grader(body["grader"]).model_dump() == validate_grader(check("ilike")).model_dump()
