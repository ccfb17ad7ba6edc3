"""`tuneforge train`: the recipes and what they share.

- local.py: LoRA / QLoRA SFT on this machine (TRL's SFTTrainer with tuneforge's loss and collator)
- dpo.py: DPO on preference pairs, from the base or a starting adapter
- kto.py: KTO on answers rated desirable or undesirable (the demo's thumbs); preference_common.py: what both share
- openai_backend.py: the same prepared data as a hosted OpenAI fine-tuning job; openai_import.py: jobs to experiments
- common.py: the setup both local recipes share (set_up: model, adapters; resume; trainer arguments; callbacks)
- trainer.py, batching.py, callbacks.py, label_eval.py, finish.py: the trainer, its rows, hooks, label scoring, saving
"""
