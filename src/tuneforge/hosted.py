"""Where the hosted OpenAI side lives for a run: the endpoint `openai:` systems are asked, and the model an
OpenAI fine-tuning job produced."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir


def openai_job_model(run: RunDir) -> str | None:
    """The fine-tuned model id of this run's OpenAI job, once it has succeeded."""
    path = run.sub("openai_job.json")
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fine_tuned_model") or None
    except (OSError, json.JSONDecodeError):
        return None


def openai_base_url(experiment: Experiment) -> str | None:
    """Where openai:<model> systems are asked: train.base_url of an openai backend, else OPENAI_BASE_URL."""
    if experiment.train.backend == "openai" and experiment.train.base_url:
        return experiment.train.base_url
    return os.environ.get("OPENAI_BASE_URL") or None
