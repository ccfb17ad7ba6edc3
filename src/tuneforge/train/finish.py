"""After training: the adapter folder, the loss plot and the manifest summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from tuneforge.train.common import full_weights, is_main_process, logged_value

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.train.common import Setup, Trained


def summarize(
    trained: Trained,
    setup: Setup,
    training: TrainingPlan,
    records: list[dict],
    params: tuple[int, int],
    attention_mode: str,
    examples: list,
) -> dict[str, Any]:
    """The run's summary as SFT and DPO both record it (DPO adds its own keys; both add the kept adapter's): steps,
    losses, speed, parameters, device. `params`: (trainable, total); `examples`: the training examples."""
    from tuneforge.data.records import common_system_prompt
    from tuneforge.train.callbacks import sum_over_ranks

    trainer = trained.trainer
    supervised = sum_over_ranks(trainer.supervised_tokens)  # each process counted its own share
    base = trained.base_metrics
    return {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "plan": training.to_json(),
        "train_loss": trained.training_loss,
        "base_eval_loss": base["eval_loss"] if base else logged_value(records, 0, "eval_loss"),
        "final_eval_loss": None,  # the kept adapter's, when there is a valid split
        "seconds": round(trained.seconds, 1),
        "supervised_tokens": supervised,
        "supervised_tokens_per_s": round(supervised / max(trained.seconds, 1e-9), 1),
        "trainable_params": params[0],
        "total_params": params[1],
        "device": setup.plan.describe(),
        "attention_mode": attention_mode,
        "resumed_from": trained.resume_from.name if trained.resume_from else None,
        "system_prompt": common_system_prompt([e.messages for e in examples]),
    }


def finish(trainer, setup: Setup, summary: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    """Save the model, plot the training and record the summary, which it returns. Every process calls it: under
    FSDP the weights are sharded, and all of them take part in gathering them before the main process saves."""
    weights = full_weights(trainer)
    if is_main_process():
        _save_and_record(trainer, setup, summary, records, weights)
    return summary


def _save_and_record(trainer, setup: Setup, summary: dict[str, Any], records: list[dict], weights: dict | None) -> None:
    """On the main process. `weights`: the full state dict when the model is sharded (FSDP); else the model's own
    parameters are saved."""
    experiment, run, quantization = setup.experiment, setup.run, setup.plan.quantization
    tokenizer, encoder = setup.tokenizer, setup.encoder
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
    print(
        f"{what} written to {target}; "
        f"eval loss {_fmt(summary['base_eval_loss'])} -> {_fmt(summary.get('final_eval_loss'))}"
    )
    if "kept_step" in summary:
        line = f"kept the adapter of step {summary['kept_step']} of {summary['steps']}: {summary['kept_because']}"
        if summary.get("valid_accuracy") is not None:
            line += (
                f"; valid accuracy {_fmt(summary.get('base_valid_accuracy'))} -> {_fmt(summary['valid_accuracy'])}, "
                f"macro-F1 {_fmt(summary['valid_macro_f1'])} "
                f"(always {summary['majority_label']!r}: {_fmt(summary['majority_accuracy'])})"
            )
        print(line)
    if summary.get("warning"):
        print(f"warning: {summary['warning']}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_adapter(
    model,
    tokenizer,
    encoder,
    experiment: Experiment,
    folder: Path,
    summary: dict[str, Any],
    quantization: str,
    weights: dict | None = None,
) -> None:
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
        atomic_write_json(
            tmp / "tuneforge.json",
            {
                "system_prompt": summary.get("system_prompt"),  # what every verb sends when the user gives none
                "base_model": experiment.model.ref,
                "base_revision": experiment.model.revision,
                "quantization": quantization,  # as resolved on the training machine
                "end_of_turn": encoder.end_of_turn,
                "full_finetune": experiment.train.full_finetune,
                "max_length": experiment.data.max_length,
                "training": summary,
            },
        )


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
    rewards = [(r["step"], r["reward"]) for r in records if "reward" in r]
    if not train:
        return
    panels = 2 if accuracy or margins or rewards else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss", markersize=6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_preference_loss(records) if margins else ("GRPO loss" if rewards else "loss (supervised tokens)"))
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs), color="grey", alpha=0.5, linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"Training ({_preference_loss(records)})" if margins else "Training")
    if accuracy:
        ax = axes[0][1]
        ax.plot(*zip(*accuracy), "o", label="valid accuracy", markersize=6)
        ax.plot(*zip(*f1), "s", label="valid macro-F1", markersize=5)
        if majority_accuracy is not None:
            ax.axhline(
                majority_accuracy,
                color="crimson",
                linestyle="--",
                linewidth=1,
                label=f"always the majority label ({majority_accuracy:.2f})",
            )
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_title("Valid split, labels scored by likelihood")
        ax.legend(loc="lower right")
    if margins:
        _preference_panel(axes[0][1], records, margins)
    if rewards:
        _reward_panel(axes[0][1], records, rewards)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _reward_panel(ax, records: list[dict], rewards: list[tuple]) -> None:
    """GRPO: the mean reward with its within-group spread, each evaluation's mean reward, and the KL to the start."""
    steps, means = zip(*rewards)
    spread = [r.get("reward_std", 0.0) for r in records if "reward" in r]
    ax.plot(steps, means, label="mean reward (train)", linewidth=1)
    ax.fill_between(
        steps,
        [m - s for m, s in zip(means, spread)],
        [m + s for m, s in zip(means, spread)],
        alpha=0.2,
        label="spread within a group",
    )
    evals = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
    if evals:
        ax.plot(*zip(*evals), "o", label="mean reward (valid)", markersize=6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("grader reward")
    kl = [(r["step"], r["kl"]) for r in records if "kl" in r]
    if kl:
        twin = ax.twinx()
        twin.plot(*zip(*kl), color="grey", alpha=0.6, linestyle=":", label="KL to the start")
        twin.set_ylabel("KL")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("Reinforcement fine-tuning")


def _preference_loss(records: list[dict]) -> str:
    """DPO's records carry the share of pairs won; KTO's (rated answers, no pairs) do not."""
    return "DPO loss" if any("preference_accuracy" in r for r in records) else "KTO loss"


def _preference_panel(ax, records: list[dict], margins: list[tuple]) -> None:
    """DPO: the reward margin (preferred over non-preferred, against the reference) and the share of pairs won.
    KTO: the margin (desirable over undesirable answers) and its KL estimate."""
    ax.plot(*zip(*margins), label="reward margin (train)", linewidth=1)
    evals = [(r["step"], r["eval_reward_margin"]) for r in records if "eval_reward_margin" in r]
    if evals:
        ax.plot(*zip(*evals), "o", label="reward margin (valid)", markersize=6)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("beta x log-ratio margin")
    wins = [(r["step"], r["preference_accuracy"]) for r in records if "preference_accuracy" in r]
    twin = ax.twinx()
    if not wins:
        _kl_line(twin, records)
        ax.legend(loc="upper left")
        ax.set_title("Preference tuning (KTO)")
        return
    twin.plot(*zip(*wins), color="seagreen", alpha=0.6, linestyle=":", label="preference accuracy (train)")
    valid_wins = [(r["step"], r["eval_preference_accuracy"]) for r in records if "eval_preference_accuracy" in r]
    if valid_wins:
        twin.plot(*zip(*valid_wins), "s", color="seagreen", label="preference accuracy (valid)", markersize=5)
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("pairs whose preferred answer wins")
    twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("Preference tuning")


def _kl_line(ax, records: list[dict]) -> None:
    """KTO's KL estimate of the policy from its reference, per step and at evaluations."""
    kl = [(r["step"], r["kl"]) for r in records if "kl" in r]
    if kl:
        ax.plot(*zip(*kl), color="grey", alpha=0.6, linestyle=":", label="KL estimate (train)")
    valid = [(r["step"], r["eval_kl"]) for r in records if "eval_kl" in r]
    if valid:
        ax.plot(*zip(*valid), "s", color="grey", label="KL estimate (valid)", markersize=5)
    ax.set_ylabel("KL to the reference")
    ax.legend(loc="lower right")
