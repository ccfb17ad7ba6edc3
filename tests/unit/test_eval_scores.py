"""Eval metrics, baselines, the judge's order swapping, and truncation of long inputs, on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from tuneforge.data.chat import ChatEncoder
from tuneforge.eval import baselines, scores
from tuneforge.eval.judge import compare, read_verdict
from tuneforge.scoring import answer_logprobs, fit_prompt, label_logprobs


def test_classification_metrics_binary_and_multiclass():
    labels = ["negative", "positive"]
    truth = ["positive", "negative", "positive", "negative"]
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.25, 0.75], [0.3, 0.7]])
    predicted = [labels[j] for j in probs.argmax(axis=1)]
    m = scores.classification(truth, predicted, probs, labels)
    assert m["accuracy"] == 0.75
    assert m["confusion"] == [[1, 1], [0, 2]]  # rows: true negative, positive
    # every positive has a higher p(positive) than every negative, even where the argmax is wrong
    assert m["roc_auc"] == 1.0
    assert 0 < m["macro_f1"] < 1 and 0 < m["precision"] <= 1 and m["recall"] == 0.75

    three = ["a", "b", "c"]
    truth3 = ["a", "b", "c", "a"]
    probs3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    m3 = scores.classification(truth3, ["a", "b", "c", "a"], probs3, three)
    assert m3["accuracy"] == 1.0 and m3["macro_f1"] == 1.0 and m3["roc_auc"] == 1.0
    assert np.trace(np.array(m3["confusion"])) == 4
    assert (
        scores.classification(["a", "a"], ["a", "b"], np.array([[0.6, 0.4], [0.4, 0.6]]), ["a", "b"])["roc_auc"] is None
    )


def test_generated_answers_map_to_labels():
    labels = ["negative", "positive"]
    assert scores.map_to_label(" Positive! ", labels) == "positive"
    assert scores.map_to_label("The review is negative, clearly.", labels) == "negative"
    assert scores.map_to_label("I cannot tell", labels) is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.5, 0.1, 200)
    low, high = scores.bootstrap_interval(values, seed=1)
    assert (low, high) == scores.bootstrap_interval(values, seed=1)
    assert low < values.mean() < high
    assert (
        high - low
        < scores.bootstrap_interval(values[:20], seed=1)[1] - scores.bootstrap_interval(values[:20], seed=1)[0]
    )
    assert scores.bootstrap_interval([1.0] * 5, seed=0) == (1.0, 1.0)


def test_rouge_and_bleu_come_through_evaluate_offline():
    same = scores.rouge_bleu(["the K2 has three finishes"], ["the K2 has three finishes"])
    assert same["rouge_l"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(100.0)
    different = scores.rouge_bleu(["completely unrelated words"], ["the K2 has three finishes"])
    assert different["rouge_l"] == 0.0 and different["bleu"] < 5
    assert len(same["rouge_l_each"]) == len(same["bleu_each"]) == 1


def test_quality_score_is_zero_to_hundred():
    assert scores.quality_score(np.array([-0.3, 0.5, 1.0])).tolist() == [0.0, 50.0, 100.0]


# three of the quickstart's eval questions (examples/data/support/eval.jsonl), their references, and right answers
# worded unlike the reference, as a model might write them
SUPPORT = [
    (
        "Which colours is the Kestrel K2 available in?",
        "The K2 comes in three finishes: Graphite, Chalk and Sage.",
        "You can get it in Graphite, Chalk or Sage.",
    ),
    (
        "How much insulation should I strip off each wire before pushing it in?",
        "Strip each wire to 6 mm (1/4 inch) of bare copper, then push it into the terminal until the tab stays down.",
        "About a quarter inch (6 mm) of bare copper; push it in until the tab stays down.",
    ),
    (
        "what does it cost to have a pro install it",
        "A Kestrel Install Partner costs a flat $99 per thermostat in the US, including the PA1 if needed. "
        "Book it in the app under Settings > Help & Support > Professional Installation.",
        "A professional install by a Kestrel Install Partner is a flat $99, booked in the app.",
    ),
]


@pytest.fixture(scope="module")
def support_vectors():
    """The builtin all-MiniLM-L6-v2 embeddings eval uses, of the questions, references and right answers."""
    from tuneforge.rag.store import Embedder

    embedder = Embedder("builtin:all-minilm-l6-v2")
    return [embedder.encode([row[column] for row in SUPPORT]) for column in range(3)]


def test_answering_rewards_answering_where_quality_rewards_repeating_the_question(support_vectors):
    questions, references, right = support_vectors
    repeated = questions  # the answer is the question, word for word

    def quality(answers):
        return scores.quality_score(scores.cosine_rows(answers, questions))

    def answering(answers):
        return scores.answering_score(answers, references, questions)

    assert (quality(repeated) == pytest.approx(100.0)) and (quality(repeated) > quality(right)).all()
    assert answering(repeated) == pytest.approx(0.0, abs=1e-4)  # nothing said beyond the question
    assert (answering(right) > 0.3).all() and (answering(references) > answering(right)).all()
    # the reference itself scores sqrt(1 - c^2), c its cosine with the question: its part the question does not say
    c = scores.cosine_rows(references, questions)
    assert answering(references) == pytest.approx(np.sqrt(1 - c**2), abs=1e-4)

    # a right answer that opens by restating the question beats a wrong one (another question's reference) ...
    restated = np.stack([q + r for q, r in zip(questions, right)])
    restated /= np.linalg.norm(restated, axis=1, keepdims=True)
    wrong = np.roll(references, 1, axis=0)
    assert (answering(restated) > answering(wrong)).all()

    # ... where reference-minus-question similarity, the obvious alternative, puts the wrong one first (on two of the
    # three): it takes off for restating the question, and the right answer's restatement costs more than it gains
    def minus(answers):
        return scores.cosine_rows(answers, references) - scores.cosine_rows(answers, questions)

    assert (minus(restated) < minus(wrong)).any()


def test_answering_is_zero_where_the_reference_only_repeats_the_question():
    question = np.array([[1.0, 0.0, 0.0]])
    assert scores.answering_score(np.array([[0.0, 1.0, 0.0]]), question, question).tolist() == [0.0]
    assert scores.answering_score(np.array([[0.6, 0.8, 0.0]]), np.array([[0.0, 1.0, 0.0]]), question).tolist() == [0.8]


def test_judge_agreement_counts_the_examples_the_judge_decided():
    # the judge: first wins, ties, loses, wins; the metric puts first ahead, ahead, behind, level
    assert scores.judge_agreement([1.0, 0.5, 0.0, 1.0], [0.9, 0.8, 0.1, 0.5], [0.2, 0.1, 0.7, 0.5]) == 2.5 / 3
    assert scores.judge_agreement([0.0, 1.0], [0.9, 0.1], [0.2, 0.7]) == 0.0  # the metric always backs the loser
    assert scores.judge_agreement([0.5, 0.5], [1.0, 0.0], [0.0, 1.0]) is None  # nothing decided, nothing to agree with


def test_read_verdict():
    assert read_verdict("A") == "A" and read_verdict("b.") == "B" and read_verdict("Tie") == "tie"
    assert (
        read_verdict("Verdict: B") == "B"
        and read_verdict("**Verdict:** A") == "A"
        and read_verdict("verdict = tie") == "tie"
    )
    assert read_verdict("Answer A is shorter, but B is right.\nVerdict: Answer B") == "B"  # the verdict line decides
    assert read_verdict("At first I'd say A.\nVerdict: A\nOn reflection... Verdict: B") == "B"  # the last one counts
    assert read_verdict("**Answer A**") == "A" and read_verdict("(B)") == "B"
    # adversarial phrasings: the article 'a' is not a vote, and prose without a verdict decides nothing
    for reply in (
        "It's a tie",
        "It's a tie.",
        "a tie",
        "draw",
        "This is a close call",
        "Both are a good answer",
        "B is slightly better but A is shorter",
        "I cannot decide between a and b",
        "",
        "both fine",
    ):
        assert read_verdict(reply) == "tie", reply


def _answer_of(chat, which):
    text = chat[-1]["content"]
    start = text.index(f"[Answer {which}]\n") + len(f"[Answer {which}]\n")
    return text[start:].split("\n\n")[0]


def test_judge_asks_both_orders_and_cancels_position_bias():
    questions, refs = ["q1", "q2", "q3"], ["r1", "r2", "r3"]
    first, second = ["good one", "meh", "good two"], ["meh", "good three", "meh"]
    asked = []

    def always_a(chats):
        asked.extend(chats)
        return ["A"] * len(chats)

    biased = compare(always_a, "Which is better?", questions, refs, "x", first, "y", second)
    assert len(asked) == 6  # every example in both orders
    assert [_answer_of(c, "A") for c in asked[:3]] == first and [_answer_of(c, "A") for c in asked[3:]] == second
    assert biased.outcomes == [0.5, 0.5, 0.5]  # a judge that only ever says "A" decides nothing
    assert biased.summary(seed=0)["ties"] == 3

    def prefers_good(chats):
        return ["A" if "good" in _answer_of(c, "A") else "B" for c in chats]

    fair = compare(prefers_good, "Which is better?", questions, refs, "x", first, "y", second)
    assert fair.outcomes == [1.0, 0.0, 1.0]
    summary = fair.summary(seed=0)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 0, 1)
    assert summary["win_rate"] == pytest.approx(2 / 3)
    assert summary["win_rate_low"] <= summary["win_rate"] <= summary["win_rate_high"]

    split = compare(lambda chats: ["A", "tie", "B"] + ["B", "tie", "B"], "r", questions, refs, "x", first, "y", second)
    assert split.outcomes == [1.0, 0.5, 0.5]  # A then (swapped) B: x both times; tie; B then B: one each way


def test_tfidf_baseline_learns_separable_labels():
    good = [[{"role": "user", "content": f"great lovely product {i}"}] for i in range(6)]
    bad = [[{"role": "user", "content": f"awful broken product {i}"}] for i in range(6)]
    model = baselines.TfidfClassifier(good + bad, ["positive"] * 6 + ["negative"] * 6, seed=0)
    probs = model.probabilities(
        [[{"role": "user", "content": "lovely"}], [{"role": "user", "content": "broken"}]], ["negative", "positive"]
    )
    assert probs.argmax(axis=1).tolist() == [1, 0]
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_ngram_baseline_generates_and_has_a_perplexity():
    answers = ["Hold the button for ten seconds.", "Hold the button for five seconds.", "Restart the thermostat."] * 3
    model = baselines.NgramModel(answers)
    assert model.generate(20).startswith("hold the button for")
    seen, words = model.logprob("Hold the button for ten seconds.")
    unseen, _ = model.logprob("purple elephants dance quietly here now")
    assert words == 8  # seven words and punctuation, plus the end
    assert seen > unseen and np.isfinite(unseen)


def test_long_prompts_are_shortened_from_the_front_and_never_crash(tiny_llama, tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer)
    long_prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world " * 200 + "What is two plus two?"},
    ]
    fitted = fit_prompt(encoder, long_prompt, 120)
    rendered = encoder.render(fitted, add_generation_prompt=True)
    assert len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]) <= 120
    assert fitted[-1]["content"].endswith("What is two plus two?") and fitted[0] == long_prompt[0]
    assert long_prompt[-1]["content"].startswith("hello world")  # the caller's messages are untouched

    conversation = long_prompt + [{"role": "assistant", "content": "Four."}]
    short = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    # the model has 256 positions
    sums, counts = answer_logprobs(tiny_llama, encoder, [conversation, short], max_length=100)
    assert np.isfinite(sums).all() and counts[0] == counts[1] > 0  # the whole answer is still scored
    scores_ = label_logprobs(
        tiny_llama,
        encoder,
        [long_prompt[:1] + [{"role": "user", "content": "x " * 400}]],
        ["positive", "negative"],
        max_length=64,
    )
    assert scores_.shape == (1, 2) and np.isfinite(scores_).all()


def test_only_the_last_answer_of_a_multi_turn_example_is_scored(tiny_llama, tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer)
    last = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Four."}]
    longer = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ] + last
    _, counts = answer_logprobs(tiny_llama, encoder, [last, longer])
    assert counts[0] == counts[1] > 0  # the same answer scored in both, and not nothing in either


def test_answer_scores_equal_the_full_log_softmax_and_project_only_the_answer_positions(talking_llama, tiny_tokenizer):
    import torch

    encoder = ChatEncoder(tiny_tokenizer)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (
            ("What is two plus two?", "Four."),
            ("Capital?", "The capital of France is Paris."),
            ("hi", "hello world"),
        )
    ]
    projected = []
    forward = talking_llama.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        projected.append(out.logits.shape[:-1].numel())
        return out

    talking_llama.forward = recording
    try:
        sums, counts = answer_logprobs(talking_llama, encoder, conversations, batch_size=3)
    finally:
        talking_llama.forward = forward
    for (total, count), messages in zip(zip(sums, counts), conversations):  # the reference: one by one, every logit
        encoded = encoder.encode(messages)
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(talking_llama(input_ids=ids).logits[0, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
        keep = torch.tensor(encoded.supervised[1:])
        assert count == int(keep.sum()) and total == pytest.approx(float(picked[keep].sum()), abs=1e-4)
    assert projected == [int(counts.sum())]  # the vocabulary projection ran for the answer tokens only
