"""The bodies of OpenAI's `POST /v1/fine_tuning/alpha/graders/run` and `/validate`, from tuneforge's grades."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tuneforge.graders.errors import KINDS
from tuneforge.graders.grading import GradeResult
from tuneforge.graders.schema import Multi, validate_grader

# the flags that come with a details field in OpenAI's response, and its name
DETAILS = {
    "model_grader_server_error": "model_grader_server_error_details",
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
}


def run_response(result: GradeResult) -> dict:
    """A GraderRunResponse: the reward, every error flag (with details where OpenAI gives them), the sub-graders'
    rewards, the time taken and the grader models' token usage."""
    errors: dict[str, Any] = {kind: kind in result.errors for kind in KINDS}
    errors.update({detail: result.errors.get(kind) for kind, detail in DETAILS.items()})
    usage = {
        model: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cached_tokens": 0}
        for model, (p, c) in result.tokens.items()
    }
    return {
        "reward": result.score,
        "metadata": {
            "name": result.name,
            "type": result.type,
            "errors": errors,
            "execution_time": result.execution_time,
            "scores": dict(result.sub_scores),
            "token_usage": sum(u["total_tokens"] for u in usage.values()) if usage else None,
            "sampled_model_name": None,
        },
        "sub_rewards": dict(result.sub_scores),
        "model_grader_token_usage_per_model": usage,
    }


def validate_response(grader: Any) -> dict:
    """A GraderValidateResponse: the grader as validated (InvalidGrader when it is not one)."""
    return {"grader": as_dict(validate_grader(grader))}


def as_dict(parsed: Any) -> dict:
    """A validated grader back in OpenAI's JSON form."""
    if isinstance(parsed, Multi):
        return {**asdict(parsed), "graders": {name: as_dict(sub) for name, sub in parsed.graders.items()}}
    return parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
