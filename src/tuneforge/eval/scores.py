"""Metrics over a system's answers: classification, reference overlap and similarity, answering, bootstrap intervals.

Every function takes plain lists or arrays, so the harness, the tests and a notebook
compute the same numbers the same way.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).parent / "metrics"
BOOTSTRAP_ROUNDS = 1000  # enough for stable 95% bounds on a few hundred examples; a fraction of a second


def classification(truth: list[str], predicted: list[str], probabilities: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro F1 / precision / recall, ROC-AUC from label probabilities, and the confusion matrix.

    ROC-AUC is binary for two labels and one-vs-rest macro for more; it is left out
    (None) when the truth holds a single class, where it is undefined.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=labels, average="macro", zero_division=0
    )
    truth_index = np.array([labels.index(t) for t in truth])
    auc = None
    if len(set(truth_index.tolist())) > 1:
        if len(labels) == 2:
            auc = float(roc_auc_score(truth_index, probabilities[:, 1]))
        else:
            present = sorted(set(truth_index.tolist()))
            scores = probabilities[:, present] / np.clip(
                probabilities[:, present].sum(axis=1, keepdims=True), 1e-12, None
            )
            auc = (
                float(roc_auc_score(truth_index, scores, multi_class="ovr", average="macro", labels=present))
                if len(present) > 2
                else float(roc_auc_score(truth_index == present[1], scores[:, 1]))
            )
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "roc_auc": auc,
        "confusion": confusion_matrix(truth, predicted, labels=labels).tolist(),
    }


def map_to_label(text: str, labels: list[str]) -> str | None:
    """A generated answer read as a label: the whole answer, else the label it mentions first; None when none."""
    cleaned = text.strip().strip(".!\"'` ").lower()
    for label in labels:
        if cleaned == label.lower():
            return label
    lowered = text.lower()
    found = [(lowered.find(label.lower()), label) for label in labels if label.lower() in lowered]
    return min(found)[1] if found else None


@cache
def _metric(script: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / script))


def rouge_bleu(answers: list[str], references: list[str]) -> dict:
    """ROUGE-L and BLEU through `evaluate`, from the metric scripts shipped in eval/metrics (no hub access)."""
    rouge = _metric("rouge_l.py").compute(predictions=answers, references=references)
    bleu = _metric("bleu.py").compute(predictions=answers, references=references)
    return {
        "rouge_l": rouge["rouge_l"],
        "rouge_l_each": rouge["rouge_l_each"],
        "bleu": bleu["bleu"],
        "bleu_each": bleu["bleu_each"],
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two stacks of L2-normalised embeddings."""
    return np.clip((a * b).sum(axis=1), -1.0, 1.0)


def quality_score(answer_vs_question: np.ndarray) -> np.ndarray:
    """0-100 from answer-to-question cosine: 0 for unrelated or opposite, 100 for the same meaning.

    It says whether an answer is on the question's topic, not whether it answers: repeating the question scores 100,
    more than the reference answer does (see answering_score).
    """
    return np.clip(answer_vs_question, 0.0, 1.0) * 100.0


def answering_score(answers: np.ndarray, references: np.ndarray, questions: np.ndarray) -> np.ndarray:
    """Cosine of each answer with what its reference says beyond its question, from L2-normalised embeddings.

    The reference's embedding minus its component along the question, normalised: an answer that repeats the
    question scores 0 (where quality gives it 100), an unrelated one about 0, and one that says what the reference
    adds scores up to sqrt(1 - c^2), c the reference's cosine with the question (the reference itself). An answer is
    neither rewarded nor punished for restating the question on the way, unlike reference minus question similarity,
    which puts a right answer that opens by restating the question level with a wrong one. 0 where the reference
    says nothing but the question.
    """
    along = (references * questions).sum(axis=1, keepdims=True)
    beyond = references - along * questions
    length = np.linalg.norm(beyond, axis=1, keepdims=True)
    beyond = np.divide(beyond, length, out=np.zeros_like(beyond), where=length > 1e-6)
    return np.clip((answers * beyond).sum(axis=1), -1.0, 1.0)


def judge_agreement(outcomes, first, second) -> float | None:
    """Of the examples a judge decided (outcome 1: `first` won, 0: it lost), the share where a per-example metric
    scores the judge's winner higher; a tie in the metric counts half. None when the judge decided none.

    How far a judge-free metric can stand in for the judge on this eval set.
    """
    outcomes, gap = np.asarray(outcomes, dtype=float), np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    decided = outcomes != 0.5
    if not decided.any():
        return None
    winner = np.where(outcomes[decided] == 1.0, 1.0, -1.0)
    return float(np.mean(np.where(gap[decided] == 0, 0.5, np.sign(gap[decided]) == winner)))


def bootstrap_interval(values, seed: int, rounds: int = BOOTSTRAP_ROUNDS, statistic=np.mean) -> tuple[float, float]:
    """95% percentile interval of `statistic` over examples resampled with replacement (seeded)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(rounds, len(values)))
    stats = np.array([statistic(values[p]) for p in picks])
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def perplexity(total_logprob: float, tokens: int) -> float | None:
    """exp of the mean negative log-likelihood per token; None when nothing was scored."""
    return float(np.exp(-total_logprob / tokens)) if tokens else None
