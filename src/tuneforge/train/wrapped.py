"""The model under its wrappers: what the trainer's head hook, the packed-attention switch and the memory plan
each reach through DDP (`.module`) and PEFT (`get_base_model`)."""


def causal_lm(model):
    """The transformers CausalLM inside DDP / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
