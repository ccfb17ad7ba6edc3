"""The training plan: auto values chosen from the data, explicit values always winning, and the few-steps warning."""

from __future__ import annotations

import pytest

from tuneforge.config import LocalTrain
from tuneforge.data import plan as rules
from tuneforge.data.plan import plan_training


def classification(n: int, length: int = 170):
    """n labelled examples: a review of `length` tokens and a one-word label (+ end-of-turn) to learn."""
    return [length] * n, [2] * n


def generation(n: int, length: int = 420):
    return [length] * n, [150] * n


def test_a_500_example_labelled_file_gets_at_least_the_minimum_of_steps():
    lengths, trainable = classification(500)
    plan = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=1024, seed=0)
    assert plan.steps >= rules.MIN_STEPS_SHORT
    assert not plan.packing  # labelled: one example per row, steps count examples
    assert plan.epochs == rules.TARGET_EPOCHS and plan.batch_size == 4  # 1,500 example passes / 200 steps: 4, not 8
    assert plan.batch_size == plan.micro_batch_size * plan.grad_accum
    assert plan.lr == rules.SHORT_ANSWER_LORA_LR and not plan.warnings  # a label's length: the higher rate
    assert plan.eval_every == -(-plan.steps // rules.EVALS_PER_RUN) and plan.save_every == plan.eval_every
    assert all(plan.reasons[k] != "set in the experiment file" for k in ("epochs", "batch_size", "lr", "packing"))


def test_explicit_values_win_and_a_plan_with_too_few_steps_names_the_keys():
    lengths, trainable = classification(480)
    train = LocalTrain(epochs=2, micro_batch_size=8, grad_accum=2, lr=1e-4, packing=True)
    plan = plan_training(train, lengths, trainable, labelled=True, max_length=384, seed=0)
    planned = (plan.epochs, plan.micro_batch_size, plan.grad_accum, plan.batch_size, plan.lr, plan.packing)
    assert planned == (2, 8, 2, 16, 1e-4, True)
    assert plan.reasons["epochs"] == plan.reasons["lr"] == plan.reasons["packing"] == "set in the experiment file"
    assert plan.steps < rules.WARN_FRACTION * rules.MIN_STEPS_SHORT
    (warning,) = plan.warnings
    assert (
        f"only {plan.steps} optimizer steps" in warning and "train.batch_size" in warning and "train.epochs" in warning
    )
    # the same file with the batch left to auto gets enough steps and no warning
    auto = plan_training(LocalTrain(epochs=2), lengths, trainable, labelled=True, max_length=384, seed=0)
    assert auto.steps >= rules.MIN_STEPS_SHORT and not auto.warnings


def test_batch_size_set_alone_is_split_into_micro_batches_that_fit():
    lengths, trainable = generation(4000, length=2048)
    plan = plan_training(LocalTrain(batch_size=16), lengths, trainable, labelled=False, max_length=2048, seed=0)
    assert plan.batch_size == 16 and plan.micro_batch_size == rules.MICRO_BATCH_TOKENS // 2048 and plan.grad_accum == 4
    two_gpus = plan_training(
        LocalTrain(batch_size=16), lengths, trainable, labelled=False, max_length=2048, seed=0, world_size=2
    )
    assert two_gpus.batch_size == 16 and two_gpus.micro_batch_size * two_gpus.grad_accum * 2 == 16
    assert two_gpus.steps == pytest.approx(plan.steps, abs=1)


def test_a_large_file_does_not_waste_passes_and_a_tiny_one_is_repeated():
    lengths, trainable = classification(20_000)
    large = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=512, seed=0)
    assert large.epochs < rules.TARGET_EPOCHS and large.batch_size == rules.MAX_BATCH
    assert large.epochs * large.examples <= rules.MAX_EXAMPLE_PASSES
    lengths, trainable = classification(50)
    tiny = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=512, seed=0)
    assert tiny.batch_size == 1 and tiny.steps >= rules.MIN_STEPS_SHORT and tiny.epochs == 4  # 50 x 4 = 200 steps
    assert "repeated" in tiny.reasons["epochs"]
    lengths, trainable = classification(5)
    assert (
        plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=512, seed=0).epochs
        == rules.MAX_EPOCHS
    )


def test_packing_is_chosen_from_the_lengths_and_long_answers_need_fewer_steps():
    lengths, trainable = generation(162, length=420)  # the support quickstart: two examples fit a 1024 row
    plan = plan_training(LocalTrain(epochs=1), lengths, trainable, labelled=False, max_length=1024, seed=0)
    assert plan.packing and plan.rows == 81 and plan.min_steps == rules.MIN_STEPS_LONG
    assert (plan.batch_size, plan.steps) == (1, 81) and not plan.warnings
    assert plan.lr == rules.LORA_LR and "long answers" in plan.reasons["lr"]
    long = plan_training(LocalTrain(), *generation(162, length=700), labelled=False, max_length=1024, seed=0)
    assert not long.packing and "over half of max_length" in long.reasons["packing"]


def test_full_finetuning_gets_a_lower_auto_rate():
    lengths, trainable = classification(500)
    assert plan_training(LocalTrain(full_finetune=True), lengths, trainable, True, 512, 0).lr == rules.FULL_FINETUNE_LR


def test_auto_and_numbers_are_the_only_values_accepted():
    from pydantic import ValidationError

    for bad in ({"epochs": 0}, {"batch_size": 0}, {"lr": "fast"}, {"packing": "sometimes"}, {"eval_every": "often"}):
        with pytest.raises(ValidationError):
            LocalTrain(**bad)


def test_an_explicit_batch_that_is_no_power_of_two_runs_as_set():
    lengths, trainable = generation(4000, length=2048)  # at most 4 sequences of 2,048 tokens fit a micro-batch
    plan = plan_training(LocalTrain(batch_size=6), lengths, trainable, labelled=False, max_length=2048, seed=0)
    assert (plan.batch_size, plan.micro_batch_size, plan.grad_accum) == (6, 3, 2)


def test_lr_multiplier_scales_the_auto_rate_and_a_set_one():
    lengths, trainable = classification(500)
    assert plan_training(LocalTrain(lr_multiplier=0.5), lengths, trainable, True, 512, 0).lr == pytest.approx(
        rules.SHORT_ANSWER_LORA_LR / 2
    )
    scaled = plan_training(LocalTrain(lr=1e-4, lr_multiplier=2.0), lengths, trainable, True, 512, 0)
    assert scaled.lr == pytest.approx(2e-4) and "lr_multiplier 2" in scaled.reasons["lr"]


def test_prompt_loss_is_off_unless_set_and_a_set_value_is_planned_as_set():
    lengths, trainable = classification(500)
    plan = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=1024, seed=0)
    assert plan.prompt_loss_weight == 0 and plan.reasons["prompt_loss_weight"].startswith("off")
    plan = plan_training(LocalTrain(prompt_loss_weight=0.3), lengths, trainable, labelled=True, max_length=1024, seed=0)
    assert plan.prompt_loss_weight == 0.3 and plan.reasons["prompt_loss_weight"] == "set in the experiment file"
    assert "prompt_loss_weight 0.3: set in the experiment file" in plan.describe()


def test_without_valid_data_the_plan_promises_no_evaluation_and_names_the_settings_it_cannot_honour():
    lengths, trainable = classification(300)
    auto = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=1024, seed=0, has_valid=False)
    line = auto.describe()[5]
    assert (
        line.startswith(f"save_every {auto.save_every}, no evaluation: no valid data;")
        and "evaluation" not in (line.split(":", 1)[1])
    )
    assert not auto.evaluates and auto.warnings == []  # nothing set, nothing to warn about
    with_valid = plan_training(LocalTrain(), lengths, trainable, labelled=True, max_length=1024, seed=0)
    assert with_valid.evaluates and with_valid.describe()[5].startswith(f"eval_every {with_valid.eval_every},")

    set_ = LocalTrain(eval_every=10, keep_best=True, save_every=20)
    plan = plan_training(set_, lengths, trainable, labelled=True, max_length=1024, seed=0, has_valid=False)
    named = [w.split(" is set")[0] for w in plan.warnings if "no valid data to evaluate on" in w]
    assert named == ["train.eval_every", "train.keep_best"] and plan.save_every == 20
    assert plan_training(set_, lengths, trainable, labelled=True, max_length=1024, seed=0).warnings == []
    assert rules.plan_grpo(set_, 40, has_valid=False).warnings == plan.warnings  # GRPO's plan says the same


def test_grpo_plan_counts_prompts_per_step_and_completions_per_prompt():
    plan = rules.plan_grpo(LocalTrain(method="grpo", grpo={"generations": 4}), 40)
    batch = plan.describe()[2]
    assert batch.startswith("batch_size 8 prompts per step, 4 completions each (one prompt's group a micro-batch")
    assert plan.describe()[-1] == f"= {plan.steps} optimizer steps over 40 prompts a pass"
