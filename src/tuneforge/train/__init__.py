"""Training backends: local (LoRA / QLoRA SFT) and, later, OpenAI fine-tuning jobs."""
