"""`tuneforge train`: the recipes and what they share.

- local.py: LoRA / QLoRA SFT on this machine (TRL's SFTTrainer with tuneforge's loss and collator)
- dpo.py: DPO on preference pairs, from the base or a starting adapter; kto.py: KTO on answers rated good or bad
- kto.py: KTO on answers rated desirable or undesirable (the demo's thumbs); preference_common.py: what both share
- grpo.py: GRPO, online reinforcement learning rewarded by an OpenAI-format grader (tuneforge.graders)
- openai_backend.py: the same prepared data as a hosted OpenAI fine-tuning job; openai_import.py: jobs to experiments
- common.py: the setup the local recipes share (set_up: model, adapters; resume; trainer arguments; callbacks)
- attention.py, memory.py, kernels.py: the packed-attention kernel, activation checkpointing, compiled layers
- trainer.py, batching.py, callbacks.py, label_eval.py, finish.py: the trainer, its rows, hooks, label scoring, saving
"""

from __future__ import annotations

from collections.abc import Callable


def recipe(method: str) -> Callable:
    """The local recipe for train.method: train_local (sft), train_dpo, train_kto or train_grpo, each called as
    `recipe(experiment, run, resume=..., progress=..., callbacks=...)`."""
    if method == "dpo":
        from tuneforge.train.dpo import train_dpo

        return train_dpo
    if method == "kto":
        from tuneforge.train.kto import train_kto

        return train_kto
    if method == "kto":
        from tuneforge.train.kto import train_kto

        return train_kto
    if method == "grpo":
        from tuneforge.train.grpo import train_grpo

        return train_grpo
    from tuneforge.train.local import train_local

    return train_local
