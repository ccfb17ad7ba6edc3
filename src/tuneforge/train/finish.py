"""After training: the adapter folder, the loss plot and the manifest summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def finish(trainer, tokenizer, encoder, experiment, run, summary: dict[str, Any], records: list[dict], quantization: str,
           weights: dict | None = None) -> None:
    """On the main process. `weights`: the full state dict when the model is sharded (FSDP), which every process
    gathered beforehand (`common.full_weights`); else the model's own parameters are saved."""
    model = trainer.accelerator.unwrap_model(trainer.model)  # the model itself, not its DDP / FSDP wrapper
    if experiment.train.full_finetune:
        # every weight trained: a whole model, in merged/ where every verb looks for one (`finetuned` falls back to
        # merged/ when there is no adapter); an adapter from an earlier LoRA run of this folder would shadow it
        target = run.sub("merged")
        save_adapter(model, tokenizer, encoder, experiment, target, summary, quantization, weights)
        stale = run.sub("adapter")
        if stale.exists():
            import shutil

            shutil.rmtree(stale)
        what = "full model"
    else:
        target = run.sub("adapter")
        save_adapter(model, tokenizer, encoder, experiment, target, summary, quantization, weights)
        what = "adapter"
    plot_training(records, run.sub("plots", "training.png"), summary.get("majority_accuracy"))
    run.record("train", summary)
    print(f"{what} written to {target}; eval loss {_fmt(summary['base_eval_loss'])} -> {_fmt(summary.get('final_eval_loss'))}")
    if "kept_step" in summary:
        line = f"kept the adapter of step {summary['kept_step']} of {summary['steps']}: {summary['kept_because']}"
        if summary.get("valid_accuracy") is not None:
            line += (f"; valid accuracy {_fmt(summary.get('base_valid_accuracy'))} -> {_fmt(summary['valid_accuracy'])}, "
                     f"macro-F1 {_fmt(summary['valid_macro_f1'])} (always {summary['majority_label']!r}: {_fmt(summary['majority_accuracy'])})")
        print(line)
    if summary.get("warning"):
        print(f"warning: {summary['warning']}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_adapter(model, tokenizer, encoder, experiment, folder: Path, summary: dict[str, Any], quantization: str,
                 weights: dict | None = None) -> None:
    """The adapter (or, fully fine-tuned, the whole model) as safetensors, the tokenizer, the exact chat template,
    and a generation config that stops at end-of-turn."""
    import copy

    generation = copy.deepcopy(model.generation_config) if getattr(model, "generation_config", None) else None
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "chat_template.jinja", tokenizer.chat_template)
        if generation is not None:
            generation.eos_token_id = encoder.stop_ids
            generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(tmp)
        atomic_write_json(tmp / "tuneforge.json", {
            "system_prompt": summary.get("system_prompt"),  # what every verb sends when the user gives none
            "base_model": experiment.model.ref,
            "base_revision": experiment.model.revision,
            "quantization": quantization,  # as resolved on the training machine
            "end_of_turn": encoder.end_of_turn,
            "full_finetune": experiment.train.full_finetune,
            "max_length": experiment.data.max_length,
            "training": summary,
        })


def plot_training(records: list[dict], path: Path, majority_accuracy: float | None = None) -> None:
    """Train loss as a line, each evaluation as a point (nothing is drawn between evaluations that was not measured),
    and with labels a second panel of valid accuracy and macro-F1 over the majority-class floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    accuracy = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    f1 = [(r["step"], r["eval_macro_f1"]) for r in records if "eval_macro_f1" in r]
    margins = [(r["step"], r["reward_margin"]) for r in records if "reward_margin" in r]
    if not train:
        return
    panels = 2 if accuracy or margins else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss", markersize=6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss" if margins else "loss (supervised tokens)")
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs), color="grey", alpha=0.5, linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("Training (DPO loss)" if margins else "Training")
    if accuracy:
        ax = axes[0][1]
        ax.plot(*zip(*accuracy), "o", label="valid accuracy", markersize=6)
        ax.plot(*zip(*f1), "s", label="valid macro-F1", markersize=5)
        if majority_accuracy is not None:
            ax.axhline(majority_accuracy, color="crimson", linestyle="--", linewidth=1, label=f"always the majority label ({majority_accuracy:.2f})")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_title("Valid split, labels scored by likelihood")
        ax.legend(loc="lower right")
    if margins:
        _preference_panel(axes[0][1], records, margins)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _preference_panel(ax, records: list[dict], margins: list[tuple]) -> None:
    """DPO: the reward margin (preferred over non-preferred, against the reference) and the share of pairs won."""
    ax.plot(*zip(*margins), label="reward margin (train)", linewidth=1)
    evals = [(r["step"], r["eval_reward_margin"]) for r in records if "eval_reward_margin" in r]
    if evals:
        ax.plot(*zip(*evals), "o", label="reward margin (valid)", markersize=6)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("beta x log-ratio margin")
    wins = [(r["step"], r["preference_accuracy"]) for r in records if "preference_accuracy" in r]
    twin = ax.twinx()
    twin.plot(*zip(*wins), color="seagreen", alpha=0.6, linestyle=":", label="preference accuracy (train)")
    valid_wins = [(r["step"], r["eval_preference_accuracy"]) for r in records if "eval_preference_accuracy" in r]
    if valid_wins:
        twin.plot(*zip(*valid_wins), "s", color="seagreen", label="preference accuracy (valid)", markersize=5)
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("pairs whose preferred answer wins")
    twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("Preference tuning")
