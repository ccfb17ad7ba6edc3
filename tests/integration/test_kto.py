"""KTO on the real builtin SmolLM2: a feedback round from the demo's thumbs (ups and lone downs, which no DPO pair
can use) continues the run's adapter, changes it, and is evaluated beside the adapter it started from."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from tuneforge.config import load_experiment

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quickstart.yaml"
SMALL = ["model.quantization=none", "data.max_length=256", "data.rag=false"]
SUPPORT = "You are Kestrel Home's support assistant for the Kestrel K2 thermostat. Answer briefly and accurately."
THUMBS = [
    ("What does error E3 mean?", "E3 means the batteries are low: replace both AA cells.", "up"),
    ("What does error E3 mean?", "Check the manual.", "down"),
    ("Can the K2 run a weekly schedule?", "Yes: set up to four periods a day in the app.", "up"),
    ("Can the K2 run a weekly schedule?", "I am not sure what a schedule is.", "down"),
    ("How do I reset the thermostat?", "Hold the dial for 10 seconds until the screen blinks.", "up"),
    ("Is the K2 waterproof?", "Yes, you can put it in the shower.", "down"),
]


def _thumbs(folder: Path) -> None:
    from tuneforge.feedback.store import FeedbackStore

    store = FeedbackStore(folder)
    for question, answer, value in THUMBS:
        store.append(
            {
                "kind": "thumb",
                "value": value,
                "messages": [{"role": "system", "content": SUPPORT}, {"role": "user", "content": question}],
                "answer": {"system": "finetuned", "identity": "sft", "text": answer, "sources": []},
            }
        )


def test_a_kto_round_from_thumbs_changes_the_adapter_and_is_evaluated_beside_previous(tmp_path, smollm_location):
    from tuneforge.cli import main
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.local import train_local

    # a run that already has an adapter (one SFT step)
    experiment = load_experiment(CONFIG, [*SMALL, "data.sample=4", "data.valid_split=0", "train.max_steps=1"])
    run = RunDir(experiment, tmp_path / "round").start("train")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    train_local(experiment, run, progress=False)
    before = (run.sub("adapter") / "adapter_model.safetensors").read_bytes()
    _thumbs(run.sub("feedback"))
    (tmp_path / "eval.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in [("What does E3 mean?", "Low batteries."), ("Can it run a schedule?", "Yes, in the app.")]
        )
    )

    started = time.perf_counter()
    code = main(
        [
            "run",
            str(CONFIG),
            "--run-dir",
            str(run.path),
            *SMALL,
            "data.feedback=true",
            "train.method=kto",
            "train.max_steps=1",
            "train.warmup_ratio=0",  # the one step trains at the full rate
            "data.valid_split=0",
            f"eval.data={tmp_path / 'eval.jsonl'}",
            "eval.systems=[finetuned]",
            "eval.max_new_tokens=8",
        ]
    )
    seconds = time.perf_counter() - started
    assert code == 0

    exported = [json.loads(x) for x in run.sub("feedback", "export", "kto.jsonl").read_text().splitlines()]
    assert sorted(line["label"] for line in exported) == [False, False, False, True, True, True]
    summary = run.read_manifest()["train"]
    assert summary["method"] == "kto" and summary["steps"] == 1
    assert (summary["desirable_answers"], summary["undesirable_answers"]) == (3, 3)
    kept = json.loads(run.sub("adapters", "previous.json").read_text())
    assert summary["init_adapter"] == kept["path"]  # the reference is the adapter the round started from
    assert (Path(kept["path"]) / "adapter_model.safetensors").read_bytes() == before
    assert (run.sub("adapter") / "adapter_model.safetensors").read_bytes() != before  # the round changed it
    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    assert set(metrics) >= {"previous", "finetuned"}
    print(
        f"KTO round: {summary['seconds'] / summary['steps']:.2f} s a step, whole round {seconds:.0f} s, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )
