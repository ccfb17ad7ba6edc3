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
batching.PROMPT_LOSS_POSITIONS of them, drawn at random), and their next-token loss (mean over the
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

from tuneforge.train.batching import head_index
from tuneforge.train.wrapped import causal_lm

# Rows of logits whose fp32 log-probabilities exist at once in the loss (chunked_cross_entropy): 1,024 rows of a
# 128k vocabulary are 500 MiB, against 1.8 GiB for the 3.7k supervised rows of an 8k-token micro-batch.
CE_CHUNK_ROWS = 1024


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
        self._head = causal_lm(self.model).get_output_embeddings()

    @contextmanager
    def _head_on(self, rows: torch.Tensor):
        """The head projects only these hidden states (flat positions in [batch x length], batching.head_index)."""

        def select(_module, args):
            hidden = args[0]
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),)

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
        """The answer's next-token loss at the supervised positions only, without asking the GPU anything: the
        collator says where they are (`head_index`) and how many (`supervised`), rows are picked with index_select,
        and the metrics stay on the device until a log line needs them."""
        labels = inputs.pop("labels")
        weights = inputs.pop("loss_weights", None)
        index, count = inputs.pop("head_index", None), inputs.pop("supervised", None)
        if index is None:  # a batch from another collator
            index, count = head_index(labels.cpu())
        index = index.to(labels.device)
        prompt = inputs.pop("prompt_index", None)  # the collator adds them when prompt_loss_weight is on
        prompt = prompt.to(labels.device) if prompt is not None and self.prompt_loss_weight and model.training else None
        rows = index if prompt is None else torch.cat([index, prompt])
        with self._head_on(rows):
            logits = model(**inputs, use_cache=False).logits  # [supervised (and prompt) positions, vocab]
        prompt_loss = None
        if prompt is not None:
            prompt_logits, logits = logits[count:], logits[:count]
            prompt_targets = inputs["input_ids"].reshape(-1).index_select(0, prompt + 1)
            prompt_loss = chunked_cross_entropy(prompt_logits, prompt_targets) / max(prompt.numel(), 1)
        targets = labels.reshape(-1).index_select(0, index + 1)
        if self.label_offsets:  # logit adjustment where an answer (a label) starts: its first target of a run
            starts = torch.ones_like(index, dtype=torch.bool)
            starts[1:] = index[1:] != index[:-1] + 1
            logits = logits.float() + starts.float()[:, None] * self._offsets(logits)  # labels: few rows
        if weights is not None:  # train.label_weights: each example's tokens count by its label's weight
            weights = weights.to(labels.device).reshape(-1).index_select(0, index + 1)
        loss_sum = chunked_cross_entropy(logits, targets, weights)
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
        self._record(model.training, logits, targets, count, loss_sum, prompt_loss)
        return (loss, {}) if return_outputs else loss

    def _record(self, training: bool, logits, targets, count: int, loss_sum, prompt_loss) -> None:
        """Token accuracy (and with a prompt loss, both losses) for the next log line, as device tensors."""
        if training:
            self.supervised_tokens += count
        metrics = getattr(self, "_metrics", None)
        if metrics is None or not count:
            return
        mode = "train" if training else "eval"
        with torch.no_grad():
            metrics[mode]["mean_token_accuracy"].append((logits.argmax(-1) == targets).float().mean())
            if prompt_loss is not None:  # metrics.jsonl's loss stays the answer's, as eval_loss is
                metrics[mode]["answer_loss"].append(loss_sum.detach() / count)
                metrics[mode]["prompt_loss"].append(prompt_loss.detach())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The step's metrics leave the device here, once per log line, not once per micro-batch."""
        for values in getattr(self, "_metrics", {}).values():
            for key, found in values.items():
                values[key] = [float(v) if isinstance(v, torch.Tensor) else v for v in found]
        super().log(logs, start_time)


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy in fp32, CE_CHUNK_ROWS rows at a time, each chunk recomputed in the backward pass.

    The plain loss keeps an fp32 copy of every projected row's log-probabilities for its backward ([rows, vocab]:
    500 KiB a row at Llama-3's vocabulary, 1.8 GiB for 3.7k supervised tokens); here only one chunk's exists at a
    time, and the saved tensor is the head's own output. Same value and gradients."""
    from torch.utils.checkpoint import checkpoint

    rows = logits.shape[0]
    if rows == 0:  # nothing supervised in this micro-batch: a zero that still has a graph
        return logits.sum() * 0.0
    chunk = chunk or CE_CHUNK_ROWS
    total = None
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        piece = checkpoint(
            _cross_entropy_sum,
            logits[part],
            targets[part],
            None if weights is None else weights[part],
            use_reentrant=False,
        )
        total = piece if total is None else total + piece
    return total


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()
