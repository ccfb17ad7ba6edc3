"""A feedback round: `data.feedback: true` trains the next adapter on what the demo's users said, from the current one.

prepare   exports the feedback (feedback/export/) and reads it instead of data.train: the supervised
          file for train.method sft, the preference pairs for dpo, every thumb as a rated answer for kto
train     keeps the run's current adapter as `previous` (runs/<name>/adapters/<hash>/) and continues
          from it (train.init_adapter, unless set), so the new adapter lands in adapter/ as before
eval      adds `previous` beside `finetuned`, so the report answers "did the feedback help?"
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.atomic import atomic_dir, atomic_write_json
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

PREVIOUS = "previous.json"


def export_folder(run: RunDir) -> Path:
    return run.sub("feedback", "export")


def feedback_data(experiment: Experiment, run: RunDir):
    """The experiment with data.train pointing at this run's exported feedback (exported now, from every record)."""
    from tuneforge.feedback.export import export
    from tuneforge.feedback.store import FeedbackStore

    records, problems = FeedbackStore(run.sub("feedback")).read()
    for problem in problems:
        print(f"warning: {problem}", flush=True)
    if not records:
        raise TuneforgeError(f"data.feedback: no feedback in {run.sub('feedback')} yet (the demo records it)")
    result = export(records, export_folder(run))
    kind = {"dpo": "preference", "kto": "kto"}.get(experiment.train.method, "supervised")
    found = result[kind]
    if not found["lines"]:
        counts = ", ".join(f"{k}: {v['lines']}" for k, v in result.items())
        raise TuneforgeError(
            f"data.feedback: the feedback holds no {kind} examples for train.method {experiment.train.method} "
            f"({counts})"
        )
    if experiment.data.train is not None:
        print(
            f"data.feedback: training on the {found['lines']} {kind} lines of the feedback instead of data.train",
            flush=True,
        )
    data = experiment.data.model_copy(
        update={
            "train": str(Path(found["path"]).resolve()),
            "valid": None,
            "format": {"preference": "preference", "kto": "kto"}.get(kind, "messages"),
            "rag": False,
        }
    )
    return _copy(experiment, data=data)


def continue_from_current(experiment: Experiment, run: RunDir):
    """Keep the run's adapter as `previous` and start the new one from it (unless train.init_adapter says otherwise)."""
    adapter = run.sub("adapter")
    if not (adapter / "adapter_config.json").exists():
        return experiment  # the first round starts from the base model
    if experiment.train.init_adapter:
        return experiment
    kept = archive(run)
    print(
        f"data.feedback: the current adapter is kept as `previous` ({kept}) and training continues from it", flush=True
    )
    return _copy(experiment, train=experiment.train.model_copy(update={"init_adapter": str(kept)}))


def archive(run: RunDir) -> Path:
    """Copy adapter/ to adapters/<first 12 of its weights' sha256>/ and record it as `previous`."""
    from tuneforge.atomic import file_sha256

    adapter = run.sub("adapter")
    weights = adapter / "adapter_model.safetensors"
    digest = file_sha256(weights) if weights.exists() else f"{int(time.time())}"
    target = run.sub("adapters", digest[:12])
    if not target.exists():
        with atomic_dir(target) as tmp:
            for item in adapter.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
    atomic_write_json(
        run.sub("adapters", PREVIOUS), {"path": str(target.resolve()), "sha256": digest, "kept": int(time.time())}
    )
    return target


def previous_adapter(run: RunDir) -> Path | None:
    path = run.sub("adapters", PREVIOUS)
    try:
        folder = Path(json.loads(path.read_text(encoding="utf-8"))["path"])
    except (OSError, ValueError, KeyError):
        return None
    return folder if (folder / "adapter_config.json").exists() else None


def with_previous(experiment: Experiment, run: RunDir):
    """eval.systems with `previous` beside `finetuned` once a feedback round kept one."""
    systems = list(experiment.eval.systems)
    if previous_adapter(run) is None or "previous" in systems:
        return experiment
    at = systems.index("finetuned") if "finetuned" in systems else len(systems)
    systems.insert(at, "previous")
    print("data.feedback: eval compares `previous` (the adapter before this round) with `finetuned`", flush=True)
    return _copy(experiment, eval=experiment.eval.model_copy(update={"systems": systems}))


def _copy(experiment: Experiment, **sections):
    out = experiment.model_copy(update=sections)
    out._source = experiment._source
    return out
