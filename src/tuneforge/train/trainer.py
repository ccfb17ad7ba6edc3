"""TRL's SFTTrainer with a loss that computes logits only where there is something to learn.

A causal LM's head turns every position's hidden state into a vocabulary-sized
row of logits (49,152 wide for SmolLM2), and the loss then discards every row whose
label is ignored. For chat data most positions are prompt: on the shipped support
data only ~45% are trained, on a classification table ~2%. So a pre-hook on the
head hands it the supervised positions alone, and the model's own forward returns
logits for just those rows. Same loss, less time, and far less peak memory (no
[batch, length, vocab] tensor). The head still runs inside the model's forward, so
a wrapper that gathers sharded weights around that forward (FSDP) covers it, and a
final logit soft-cap (Gemma) is applied by the model as usual.

With train.prompt_loss_weight the head also projects the prompt positions the collator
marks (never across a packed row's example boundary, never onto padding; at most
PROMPT_LOSS_POSITIONS of them, drawn at random), and their next-token loss (mean over the
micro-batch's prompt tokens, times the weight) joins the answer's. Evaluation losses stay
the answer's alone.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from tuneforge.train.batching import IGNORE

# Prompt positions whose next-token loss one micro-batch computes, drawn at random when it has more: the mean stays an
# unbiased estimate, and the [positions, vocab] logits stay bounded (2,048 x Llama-3's 128k vocabulary is 1 GB in fp32,
# where a micro-batch of 8,192 prompt tokens would be 4 GB). A batch of 4 real reviews has about 700 (at most 2,200).
PROMPT_LOSS_POSITIONS = 2048


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside DDP / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Random groups of similar-length rows, the same for a given seed and epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class ForgeTrainer(SFTTrainer):
    def __init__(
        self,
        *args,
        label_eval=None,
        label_offsets: dict[int, float] | None = None,
        prompt_loss_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.prompt_loss_weight = prompt_loss_weight
        self.label_eval = label_eval  # train.label_eval.LabelEval when the data has labels
        self.label_offsets = label_offsets  # train.label_adjustment: label first-token id -> tau x log(prior)
        self._offset_row: torch.Tensor | None = None
        # Our loss divides by the supervised-token count of the whole accumulated batch.
        self.model_accepts_loss_kwargs = True
        self.supervised_tokens = 0
        self._head = _causal_lm(self.model).get_output_embeddings()

    @contextmanager
    def _head_on(self, chosen: torch.Tensor):
        """The head projects only the hidden states whose next token is a target ([batch, length - 1] mask)."""

        def select(_module, args):
            return (args[0][:, :-1][chosen],)

        handle = self._head.register_forward_pre_hook(select)
        try:
            yield
        finally:
            handle.remove()

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches drawn from a generator seeded by the run's seed and the epoch, so a resumed run
        sees the batches an uninterrupted one would (the library's sampler draws from the global RNG, which a
        resume restores to the checkpoint's state, not the epoch's start)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in getattr(
            dataset, "column_names", ()
        ):
            return super()._get_train_sampler(train_dataset)
        return SeededLengthGroupedSampler(
            dataset["length"], self.args.train_batch_size * self.args.gradient_accumulation_steps, self.args.seed
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With labels: one scoring pass over the valid prompts gives loss, accuracy and macro-F1; else the usual
        loop."""
        if self.label_eval is None or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        started = time.perf_counter()
        scored = self.label_eval(
            self.model, batch_size=self.args.per_device_eval_batch_size, step=self.state.global_step
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scored.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _offsets(self, logits: torch.Tensor) -> torch.Tensor:
        if self._offset_row is None or self._offset_row.device != logits.device:
            row = torch.zeros(logits.shape[-1], device=logits.device)
            for token, offset in self.label_offsets.items():
                row[token] = offset
            self._offset_row = row
        return self._offset_row

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.label_eval is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            self.label_eval.save_state(Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        weights = inputs.pop("loss_weights", None)
        shift_labels = labels[:, 1:]
        chosen = shift_labels != IGNORE
        prompt = inputs.pop("prompt_targets", None)  # the collator marks them when prompt_loss_weight is on
        prompt = prompt.to(chosen.device) if prompt is not None and self.prompt_loss_weight and model.training else None
        if prompt is not None and int(prompt.sum()) > PROMPT_LOSS_POSITIONS:
            where = prompt.nonzero()
            keep = where[torch.randperm(len(where), device=where.device)[:PROMPT_LOSS_POSITIONS]]
            prompt = torch.zeros_like(prompt)
            prompt[keep[:, 0], keep[:, 1]] = True
        projected = chosen if prompt is None else chosen | prompt
        with self._head_on(projected):
            logits = model(**inputs, use_cache=False).logits.float()  # [supervised (and prompt) positions, vocab]
        prompt_loss = None
        if prompt is not None:
            prompt_logits, logits = logits[prompt[projected]], logits[chosen[projected]]
            prompt_loss = (
                F.cross_entropy(prompt_logits, inputs["input_ids"][:, 1:][prompt]) if prompt_logits.shape[0] else None
            )
        if self.label_offsets:  # logit adjustment where an answer (a label) starts: its first target of a run
            starts = chosen & ~F.pad(chosen[:, :-1], (1, 0), value=False)
            logits = logits + starts[chosen].to(logits.dtype)[:, None] * self._offsets(logits)
        targets = shift_labels[chosen]
        if weights is not None:  # train.label_weights: each example's tokens count by its label's weight
            loss_sum = (
                F.cross_entropy(logits, targets, reduction="none") * weights[:, 1:][chosen].to(logits.device)
            ).sum()
        else:
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        count = int(chosen.sum())
        denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
        loss = loss_sum / denominator
        if prompt_loss is not None:
            # each micro-batch's prompt mean counts by its share of the step's answer tokens, so accumulation and
            # several processes add up to weight x one mean per step, as the answer loss adds up to one mean
            share = count / denominator if num_items_in_batch is not None else 1.0
            loss = loss + self.prompt_loss_weight * prompt_loss * share
        if (
            num_items_in_batch is not None
            and self.args.average_tokens_across_devices
            and self.accelerator.num_processes > 1
        ):
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was summed over ranks

        mode = "train" if model.training else "eval"
        if model.training:
            self.supervised_tokens += count
        metrics = getattr(self, "_metrics", None)
        if metrics is not None and count:
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == targets).float().mean().item()
            metrics[mode]["mean_token_accuracy"].append(accuracy)
            if prompt_loss is not None:  # metrics.jsonl's loss stays the answer's, as eval_loss is
                metrics[mode]["answer_loss"].append(loss_sum.item() / count)
                metrics[mode]["prompt_loss"].append(prompt_loss.item())
        return (loss, {}) if return_outputs else loss
