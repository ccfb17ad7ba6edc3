"""Graders in OpenAI's format, as rewards (GRPO) and eval metrics: string_check, text_similarity, score_model,
label_model, python and multi, with `{{item.*}}` / `{{sample.*}}` templating.

    validate_grader(grader)             the grader as a typed object, or InvalidGrader naming every bad field
    grade(grader, sample, item)         one GradeResult: score (0 where the grader failed), errors by kind
    run_grader(grader, samples, items)  the same over a batch
    run_response(result)                OpenAI's graders/run response body; validate_response for /validate
"""

from tuneforge.graders.errors import KINDS, GraderError, InvalidGrader
from tuneforge.graders.grading import GradeResult, grade, run_grader
from tuneforge.graders.response import run_response, validate_response
from tuneforge.graders.sandbox import Limits
from tuneforge.graders.schema import Multi, validate_grader

__all__ = [
    "KINDS",
    "GradeResult",
    "GraderError",
    "InvalidGrader",
    "Limits",
    "Multi",
    "grade",
    "run_grader",
    "run_response",
    "validate_grader",
    "validate_response",
]
