"""Valid accuracy and macro-F1 during training, when the data has labels.

A classifier's eval loss says little about whether it picks the right label: a
model that learned only how common each label is has a low loss and answers the
majority class every time. So each evaluation scores every valid prompt's labels
by likelihood with the same function `tuneforge eval` uses
(`eval.classify.label_logprobs`), and reports accuracy, macro-F1 and the loss of
the true labels from that one pass.
"""

from __future__ import annotations

import numpy as np

from tuneforge.data.report import label_summary

SELECTION_LOSS_WEIGHT = 1e-4  # the kept checkpoint: best accuracy; among equal accuracies, the lower valid loss


class LabelEval:
    def __init__(self, encoder, examples, labels: list[str], max_length: int):
        self.encoder = encoder
        self.labels = labels
        self.max_length = max_length
        self.prompts = []
        for e in examples:
            last = max(i for i, m in enumerate(e.messages) if m.get("role") == "assistant")
            self.prompts.append(e.messages[:last])
        self.truth = np.array([labels.index(e.label) for e in examples])
        floor = label_summary(examples)  # the same floor prepare's report shows for this split
        self.majority_label, self.majority_accuracy = floor["majority_label"], floor["majority_accuracy"]

    def __call__(self, model, batch_size: int = 8) -> dict[str, float]:
        scores, counts = self.score(model, batch_size)
        predicted = scores.argmax(axis=1)
        rows = np.arange(len(self.truth))
        loss = float(-scores[rows, self.truth].sum() / max(counts[rows, self.truth].sum(), 1))
        accuracy = float((predicted == self.truth).mean())
        return {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1(self.truth, predicted, len(self.labels)),
                "selection": accuracy - SELECTION_LOSS_WEIGHT * min(loss, 100.0)}


    def score(self, model, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Every valid prompt's label log-likelihoods and token counts. In a distributed run each process scores
        every world_size-th prompt and the parts are gathered, so all processes get the whole table for the
        price of their share."""
        from tuneforge.eval.classify import label_logprobs
        from tuneforge.train.callbacks import distributed

        dist = distributed()
        if dist is None:
            return label_logprobs(model, self.encoder, self.prompts, self.labels, batch_size, self.max_length, return_counts=True)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = list(range(rank, len(self.prompts), world))
        empty = np.zeros((0, len(self.labels)))
        part = (label_logprobs(model, self.encoder, [self.prompts[i] for i in mine], self.labels, batch_size, self.max_length,
                               return_counts=True) if mine else (empty, empty))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (mine, np.asarray(part[0]), np.asarray(part[1])))
        scores, counts = np.zeros((len(self.prompts), len(self.labels))), np.zeros((len(self.prompts), len(self.labels)))
        for rows, part_scores, part_counts in gathered:
            if rows:
                scores[rows], counts[rows] = part_scores, part_counts
        return scores, counts


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> float:
    """Mean F1 over the labels that occur in the truth or the predictions (sklearn's macro average with zero_division=0)."""
    scores = []
    for label in range(n_labels):
        tp = int(((predicted == label) & (truth == label)).sum())
        fp = int(((predicted == label) & (truth != label)).sum())
        fn = int(((predicted != label) & (truth == label)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
