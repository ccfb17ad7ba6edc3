"""Accuracy of the base model and the run's adapter on a classification run's valid split.

    python scripts/label_accuracy.py configs/reviews-sentiment.yaml [--run-dir DIR]

Each label is scored as the whole assistant answer (tuneforge.eval.classify); the
highest-likelihood label is the prediction. A stopgap until `tuneforge eval` (issue #9).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--run-dir")
    args = parser.parse_args()

    from peft import PeftModel

    from tuneforge.config import load_experiment
    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepare import load_prepared
    from tuneforge.eval.classify import label_logprobs
    from tuneforge.models import keep_4bit_layers_differentiable, load_model, load_tokenizer
    from tuneforge.run import RunDir

    experiment = load_experiment(args.file)
    run = RunDir(experiment, args.run_dir)
    examples = load_prepared(run.sub("data"), "valid")
    labels = sorted({e.label for e in examples})
    truth = np.array([labels.index(e.label) for e in examples])
    prompts = [e.messages[:-1] for e in examples]
    encoder = ChatEncoder(load_tokenizer(experiment.model))
    for name in ("base", "finetuned"):
        model = load_model(experiment.model)
        keep_4bit_layers_differentiable(model)  # score on the numerical path training used
        if name == "finetuned":
            model = PeftModel.from_pretrained(model, run.sub("adapter"))
        predicted = label_logprobs(model, encoder, prompts, labels).argmax(axis=1)
        print(f"{name:<10} accuracy {np.mean(predicted == truth):.3f} on {len(examples)} examples "
              f"(predicted: {', '.join(f'{l} {int(np.sum(predicted == i))}' for i, l in enumerate(labels))})")


if __name__ == "__main__":
    main()
