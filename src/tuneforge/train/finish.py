"""After training: the adapter folder, the loss plot and the manifest summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def finish(trainer, tokenizer, encoder, experiment, run, summary: dict[str, Any], records: list[dict]) -> None:
    save_adapter(trainer.model, tokenizer, encoder, experiment, run.sub("adapter"), summary)
    plot_training(records, run.sub("plots", "training.png"))
    run.record("train", summary)
    print(f"adapter written to {run.sub('adapter')}; eval loss {_fmt(summary['base_eval_loss'])} -> {_fmt(summary['final_eval_loss'])}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_adapter(model, tokenizer, encoder, experiment, folder: Path, summary: dict[str, Any]) -> None:
    """adapter (safetensors), tokenizer, the exact chat template, and a generation config that stops at end-of-turn."""
    import copy

    generation = copy.deepcopy(model.generation_config) if getattr(model, "generation_config", None) else None
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "chat_template.jinja", tokenizer.chat_template)
        if generation is not None:
            generation.eos_token_id = encoder.stop_ids
            generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(tmp)
        atomic_write_json(tmp / "tuneforge.json", {
            "base_model": experiment.model.ref,
            "base_revision": experiment.model.revision,
            "quantization": experiment.model.quantization,
            "end_of_turn": encoder.end_of_turn,
            "full_finetune": experiment.train.full_finetune,
            "max_length": experiment.data.max_length,
            "training": summary,
        })


def plot_training(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs), color="grey", alpha=0.5, linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("Training")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
