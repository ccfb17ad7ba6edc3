"""What the preference recipes (DPO's pairs, KTO's rated answers) share: where an encoded answer starts and
ends, the token count their trainers keep, and the kept adapter's reward margin."""

from __future__ import annotations

from typing import Any

REFERENCE = "ref"  # the name TRL gives the frozen copy of a starting adapter


class CountsCompletionTokens:
    """Mixed into TRL's DPO, KTO and GRPO trainers: counts the answer tokens trained on (their completion_mask),
    which metrics.jsonl's tokens/s and the summary read."""

    supervised_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "completion_mask" in inputs:
            self.supervised_tokens += int(inputs["completion_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def answer_span(encoded) -> tuple[int, int]:
    """(first, last + 1) of the encoded example's supervised positions; (length, length) when there are none."""
    positions = [i for i, keep in enumerate(encoded.supervised) if keep]
    if not positions:
        return len(encoded.input_ids), len(encoded.input_ids)
    return positions[0], positions[-1] + 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def kept_margin(records: list[dict], kept_step: int) -> dict[str, Any]:
    """The kept adapter's reward margin (and DPO's preference accuracy) on the valid split, when that step was
    evaluated."""
    kept = next((r for r in records if r.get("step") == kept_step and "eval_reward_margin" in r), None)
    if kept is None:
        return {}
    out = {"valid_reward_margin": kept["eval_reward_margin"]}
    if "eval_preference_accuracy" in kept:
        out["valid_preference_accuracy"] = kept["eval_preference_accuracy"]
    return out


def drop_reference(model) -> None:
    """The frozen copy of the starting adapter is the reference, not part of the result."""
    if REFERENCE in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE)
