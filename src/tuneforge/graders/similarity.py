"""The text_similarity grader's metrics, each a number in [0, 1] for one answer against one reference.

They are written here from their papers (a few lines each) rather than taken from the eval extra's sacrebleu and
rouge_score, so a GRPO reward needs no optional package. Text is compared as lowercased words (`\\w+`), the
way rouge_score reads it. Differences from the usual packages, where a reader might expect their numbers:
BLEU is sentence BLEU up to 4-grams with sacreBLEU's exponential smoothing and effective order; GLEU is Google's
sentence GLEU (min of n-gram precision and recall, n = 1..4, as nltk's); METEOR matches exact words only (no
stems or synonyms: WordNet is a download) with Banerjee and Lavie's weights (alpha 0.9, beta 3, gamma 0.5);
fuzzy_match is difflib's ratio without its junk heuristic (2 * matched characters / total, like rapidfuzz's
ratio); cosine is the builtin embedder's (all-MiniLM-L6-v2), below 0 read as 0.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from functools import cache

WORD = re.compile(r"\w+")
EMBEDDER = "builtin:all-minilm-l6-v2"  # what rag and eval embed with: no download, ~90 MB on CPU


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def f1(overlap: int, predicted: int, expected: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def fuzzy_match(answer: str, reference: str) -> float:
    if not answer and not reference:
        return 1.0
    return difflib.SequenceMatcher(None, answer, reference, autojunk=False).ratio()


def rouge_n(answer: str, reference: str, n: int) -> float:
    got, want = ngrams(words(answer), n), ngrams(words(reference), n)
    return f1(sum((got & want).values()), sum(got.values()), sum(want.values()))


def rouge_l(answer: str, reference: str) -> float:
    got, want = words(answer), words(reference)
    return f1(_lcs(got, want), len(got), len(want))


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, 1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def bleu(answer: str, reference: str, order: int = 4) -> float:
    got, want = words(answer), words(reference)
    if not set(got) & set(want):  # no word in common: 0, as sacreBLEU stops early
        return 0.0
    logs, halvings = [], 1.0
    for n in range(1, order + 1):
        total = max(len(got) - n + 1, 0)
        if not total:  # effective order: an answer shorter than n has no n-grams to judge
            break
        matched = sum((ngrams(got, n) & ngrams(want, n)).values())
        if not matched:  # sacreBLEU's "exp" smoothing: each empty order counts half the one before
            halvings *= 2
        logs.append(math.log(matched / total if matched else 1 / (halvings * total)))
    brevity = 1.0 if len(got) > len(want) else math.exp(1 - len(want) / len(got))
    return brevity * math.exp(sum(logs) / len(logs))


def gleu(answer: str, reference: str, order: int = 4) -> float:
    got, want = words(answer), words(reference)
    got_grams = sum((ngrams(got, n) for n in range(1, order + 1)), Counter())
    want_grams = sum((ngrams(want, n) for n in range(1, order + 1)), Counter())
    matched = sum((got_grams & want_grams).values())
    if not matched:
        return 0.0
    return min(matched / sum(got_grams.values()), matched / sum(want_grams.values()))


def meteor(answer: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    got, want = words(answer), words(reference)
    free = {}
    for j, word in enumerate(want):
        free.setdefault(word, []).append(j)
    pairs = [(i, free[word].pop(0)) for i, word in enumerate(got) if free.get(word)]
    if not pairs:
        return 0.0
    precision, recall = len(pairs) / len(got), len(pairs) / len(want)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (i, j), (k, m) in zip(pairs, pairs[1:]) if not (k == i + 1 and m == j + 1))
    return fmean * (1 - gamma * (chunks / len(pairs)) ** beta)


@cache
def builtin_embedder():
    from tuneforge.rag.store import Embedder

    return Embedder(EMBEDDER)


def cosine(answer: str, reference: str, embedder=None) -> float:
    """Cosine of the two texts' embeddings (`embedder.encode` L2-normalises, as rag's Embedder does)."""
    a, b = (embedder or builtin_embedder()).encode([answer, reference])
    return min(max(float((a * b).sum()), 0.0), 1.0)


METRICS = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    "rouge_l": rouge_l,
    **{f"rouge_{n}": (lambda a, r, n=n: rouge_n(a, r, n)) for n in range(1, 6)},
}


def similarity(metric: str, answer: str, reference: str, embedder=None) -> float:
    if metric == "cosine":
        return cosine(answer, reference, embedder)
    return METRICS[metric](answer, reference)
