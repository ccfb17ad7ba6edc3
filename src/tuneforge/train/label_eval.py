"""Valid accuracy and macro-F1 during training, when the data has labels.

A classifier's eval loss says little about whether it picks the right label: a
model that learned only how common each label is has a low loss and answers the
majority class every time. So each evaluation scores every valid prompt's labels
by likelihood with the same function `tuneforge eval` uses
(`eval.classify.label_logprobs`), and reports accuracy, macro-F1 and the loss of
the true labels from that one pass.

Which checkpoint to keep is decided with the valid split's noise in mind. On 45
valid reviews one example is 2.2 points of accuracy, and picking the evaluation
with the highest accuracy kept an early, less trained checkpoint in three runs
of four on real reviews (held-out accuracy 0.78-0.82 where the last step's was
0.81-0.83). So a later evaluation replaces the kept one unless the kept one is
better beyond chance: a one-sided sign test over the examples the two label
differently, at 5%. A run that degrades (a learning rate too high, say) still
keeps its earlier checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tuneforge.data.records import label_summary

SIGNIFICANCE = 0.05  # an earlier checkpoint stays kept only when a later one is worse with this little chance of luck
STATE_FILE = "label_selection.json"  # in each checkpoint: what the kept evaluation got right, for a resumed run


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
        self.kept: dict | None = None  # the evaluation kept so far: step, selection score, which examples it got right

    def __call__(self, model, batch_size: int = 8, step: int | None = None) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of the valid split; at a training step also `selection`, whose maximum over the
        run is the evaluation to keep (the trainer keeps the checkpoint with the highest)."""
        scores, counts = self.score(model, batch_size)
        predicted = scores.argmax(axis=1)
        rows = np.arange(len(self.truth))
        loss = float(-scores[rows, self.truth].sum() / max(counts[rows, self.truth].sum(), 1))
        accuracy = float((predicted == self.truth).mean())
        out = {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1(self.truth, predicted, len(self.labels))}
        if step:  # step 0 is the base model: logged, never a checkpoint to keep
            out["selection"] = self.select(step, predicted == self.truth)
        return out

    def select(self, step: int, correct: np.ndarray) -> float:
        """This evaluation replaces the kept one (a higher score) unless the kept one is significantly better."""
        if self.kept is not None and kept_is_better(np.asarray(self.kept["correct"], dtype=bool), correct):
            return self.kept["score"] - 1.0
        score = self.kept["score"] + 1.0 if self.kept is not None else 1.0
        self.kept = {"step": step, "score": score, "correct": correct.astype(int).tolist()}
        return score

    def save_state(self, checkpoint: Path) -> None:
        if self.kept is not None:
            from tuneforge.atomic import atomic_write_json

            atomic_write_json(Path(checkpoint) / STATE_FILE, self.kept)

    def restore_state(self, checkpoint: Path) -> None:
        """A resumed run compares its next evaluations with the one its checkpoint had kept."""
        path = Path(checkpoint) / STATE_FILE
        if path.exists():
            self.kept = json.loads(path.read_text(encoding="utf-8"))

    def score(self, model, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Every valid prompt's label log-likelihoods and token counts. In a distributed run each process scores
        every world_size-th prompt and the parts are gathered, so all processes get the whole table for the
        price of their share."""
        from tuneforge.models import under_fsdp
        from tuneforge.scoring import label_logprobs
        from tuneforge.train.callbacks import distributed

        dist = distributed()
        if (
            dist is None or under_fsdp()
        ):  # FSDP gathers weights inside every forward: all processes must run the same ones
            return label_logprobs(
                model, self.encoder, self.prompts, self.labels, batch_size, self.max_length, return_counts=True
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = list(range(rank, len(self.prompts), world))
        empty = np.zeros((0, len(self.labels)))
        part = (
            label_logprobs(
                model,
                self.encoder,
                [self.prompts[i] for i in mine],
                self.labels,
                batch_size,
                self.max_length,
                return_counts=True,
            )
            if mine
            else (empty, empty)
        )
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (mine, np.asarray(part[0]), np.asarray(part[1])))
        scores, counts = (
            np.zeros((len(self.prompts), len(self.labels))),
            np.zeros((len(self.prompts), len(self.labels))),
        )
        for rows, part_scores, part_counts in gathered:
            if rows:
                scores[rows], counts[rows] = part_scores, part_counts
        return scores, counts


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> float:
    """Mean F1 over the labels that occur in the truth or the predictions (sklearn's macro average with
    zero_division=0)."""
    scores = []
    for label in range(n_labels):
        tp = int(((predicted == label) & (truth == label)).sum())
        fp = int(((predicted == label) & (truth != label)).sum())
        fn = int(((predicted != label) & (truth == label)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def kept_is_better(kept: np.ndarray, new: np.ndarray, alpha: float = SIGNIFICANCE) -> bool:
    """One-sided exact sign test on the examples the two evaluations label differently (right vs wrong): is the kept
    one better than the new one beyond what chance gives at level alpha?"""
    wins, losses = int((kept & ~new).sum()), int((~kept & new).sum())
    n = wins + losses
    if wins <= losses:
        return False
    p_value = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n
    return p_value < alpha
