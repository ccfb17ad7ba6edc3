"""Classical baselines trained on the run's prepared train split: how much does a language model add?

tfidf   TF-IDF features of the prompt + logistic regression (classification)
majority  always the most common training label: the floor every classifier must beat
          (added to every classification eval)
ngram   a word trigram language model of the training answers (generation): it
        answers every question with its most likely answer, and has a perplexity
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

from tuneforge.errors import TuneforgeError

BASELINES = ("tfidf", "ngram", "majority")
WORD = re.compile(r"\w+|[^\w\s]")
START, END = "<s>", "</s>"


def prompt_text(messages: list[dict]) -> str:
    """What a classical model sees of a chat prompt: its user turns (the system message is the same in every row)."""
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")


def last_answer(messages: list[dict]) -> str:
    answers = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
    return answers[-1] if answers else ""


class TfidfClassifier:
    """Word 1-2 gram TF-IDF of the prompt, then multinomial logistic regression."""

    def __init__(self, prompts: list[list[dict]], labels: list[str], seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) < 2:
            raise TuneforgeError("the tfidf baseline needs at least two labels in the train split")
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        features = self.vectorizer.fit_transform([prompt_text(p) for p in prompts])
        self.model = LogisticRegression(max_iter=1000, C=10.0, random_state=seed).fit(
            features, labels
        )  # C=10: small data, weak regularisation

    def probabilities(self, prompts: list[list[dict]], labels: list[str]) -> np.ndarray:
        """[n, len(labels)] class probabilities in the order of `labels` (0 for labels unseen in training)."""
        raw = self.model.predict_proba(self.vectorizer.transform([prompt_text(p) for p in prompts]))
        out = np.zeros((len(prompts), len(labels)))
        for column, label in enumerate(self.model.classes_):
            if label in labels:
                out[:, labels.index(label)] = raw[:, column]
        return out


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class NgramModel:
    """Interpolated trigram/bigram/unigram word model with add-one unigrams, so every word has a probability."""

    WEIGHTS = (0.6, 0.3, 0.1)  # trigram, bigram, unigram: fixed interpolation, enough for a baseline

    def __init__(self, answers: list[str]):
        self.unigrams: Counter = Counter()
        self.bigrams: dict[str, Counter] = defaultdict(Counter)
        self.trigrams: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for answer in answers:
            tokens = [START, START, *words(answer), END]
            for i in range(2, len(tokens)):
                self.unigrams[tokens[i]] += 1
                self.bigrams[tokens[i - 1]][tokens[i]] += 1
                self.trigrams[(tokens[i - 2], tokens[i - 1])][tokens[i]] += 1
        if not self.unigrams:
            raise TuneforgeError("the ngram baseline found no answers in the train split")
        self.total = sum(self.unigrams.values())
        self.vocabulary = len(self.unigrams) + 1  # +1: any unseen word

    def probability(self, previous: tuple[str, str], word: str) -> float:
        tri, bi = self.trigrams.get(previous), self.bigrams.get(previous[1])
        p3 = tri[word] / sum(tri.values()) if tri else 0.0
        p2 = bi[word] / sum(bi.values()) if bi else 0.0
        p1 = (self.unigrams[word] + 1) / (self.total + self.vocabulary)
        w3, w2, w1 = self.WEIGHTS
        if not tri:  # back off: give the missing trigram's weight to the lower orders
            w2, w1 = w2 + w3 * 2 / 3, w1 + w3 / 3
            w3 = 0.0
        return w3 * p3 + w2 * p2 + w1 * p1

    def logprob(self, text: str) -> tuple[float, int]:
        """Natural-log probability of the text as an answer (with its end), and the number of words scored."""
        tokens = [START, START, *words(text), END]
        total = sum(
            math.log(self.probability((tokens[i - 2], tokens[i - 1]), tokens[i])) for i in range(2, len(tokens))
        )
        return total, len(tokens) - 2

    def generate(self, max_words: int) -> str:
        """The greedy most likely answer (the same for every question: the model does not read the prompt)."""
        previous, out = (START, START), []
        for _ in range(max_words):
            candidates = set(self.trigrams.get(previous, {})) | set(self.bigrams.get(previous[1], {}))
            if not candidates:
                break
            word = max(sorted(candidates), key=lambda w: self.probability(previous, w))
            if word == END:
                break
            out.append(word)
            previous = (previous[1], word)
        return _detokenize(out)


def _detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    return re.sub(r" ([^\w\s])", r"\1", text)
