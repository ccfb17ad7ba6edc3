"""What goes wrong while grading, named as OpenAI's graders/run response names it."""

from __future__ import annotations

from tuneforge.errors import TuneforgeError

# the error flags of OpenAI's graders/run metadata (GraderRunResponse.metadata.errors), one per way a grade fails
KINDS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)


class GraderError(TuneforgeError):
    """A grader could not grade one sample; the sample scores 0 and the error is counted under `kind`."""

    def __init__(self, kind: str, message: str):
        assert kind in KINDS, kind
        self.kind = kind
        super().__init__(message)


class InvalidGrader(TuneforgeError):
    """A grader definition that is not OpenAI's format; every problem is listed, each with its field path."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"grader: {len(problems)} {noun}\n" + "\n".join(f"  - {p}" for p in problems))
