"""One grader applied to one answer: the score, and what went wrong if anything did.

A grader that fails on a sample scores it 0, as OpenAI documents, and the error is kept by kind so a run counts
them. A multi grader's failed sub-grader counts 0 in the formula (the others keep their credit) and its error is
the multi's too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tuneforge.graders import formula
from tuneforge.graders.errors import GraderError
from tuneforge.graders.model import label_model, score_model
from tuneforge.graders.sandbox import Limits, run_python
from tuneforge.graders.schema import Multi, validate_grader
from tuneforge.graders.similarity import similarity
from tuneforge.graders.template import make_sample, render


@dataclass
class GradeResult:
    """One sample's grade."""

    score: float
    """The reward: the grader's value, 0 where it failed."""
    name: str
    type: str
    errors: dict[str, str] = field(default_factory=dict)
    """What went wrong, by OpenAI's error kind (model_grader_parse_error, python_grader_runtime_error, ...)."""
    sub_scores: dict[str, float] = field(default_factory=dict)
    """A multi grader's sub-graders' scores by name."""
    execution_time: float = 0.0
    """Seconds spent grading."""
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Prompt and completion tokens the grader models used, by the grader's model name."""

    @property
    def error(self) -> str | None:
        """The errors in one line, or None when the grade went through."""
        return "; ".join(f"{kind}: {message}" for kind, message in self.errors.items()) or None


def grade(
    grader: Any, sample: str | dict, item: Any = None, *, model=None, embedder=None, limits: Limits = Limits()
) -> GradeResult:
    """Grade one answer (`sample`: its text, or OpenAI's sample dict) against its dataset record (`item`).

    `grader` is OpenAI's grader dict (validated here; InvalidGrader when it is not one) or what
    `validate_grader` returned. `model` answers score_model and label_model graders: a callable from chat
    messages to text, a tuneforge system, or a mapping from the grader's model name to either. `embedder`
    replaces the builtin one for text_similarity's cosine; `limits` bound python graders.
    """
    parsed = validate_grader(grader) if isinstance(grader, dict) else grader
    started = time.perf_counter()
    result = GradeResult(0.0, parsed.name, parsed.type)
    try:
        shaped = make_sample(sample)
        if isinstance(parsed, Multi):
            result.score = _multi(parsed, shaped, item, result, dict(model=model, embedder=embedder, limits=limits))
        else:
            result.score = _single(parsed, shaped, item, result, model, embedder, limits)
    except GraderError as exc:  # the score stays 0
        result.errors.setdefault(exc.kind, str(exc))
    result.execution_time = time.perf_counter() - started
    return result


def _single(grader: Any, sample: dict, item: Any, result: GradeResult, model, embedder, limits: Limits) -> float:
    if grader.type == "string_check":
        given, reference = render(grader.input, sample, item), render(grader.reference, sample, item)
        passed = {
            "eq": given == reference,
            "ne": given != reference,
            "like": reference in given,
            "ilike": reference.lower() in given.lower(),
        }[grader.operation]
        return 1.0 if passed else 0.0
    if grader.type == "text_similarity":
        given, reference = render(grader.input, sample, item), render(grader.reference, sample, item)
        return similarity(grader.evaluation_metric, given, reference, embedder)
    if grader.type == "python":
        return run_python(grader.source, sample, item, limits)
    score, reply = (score_model if grader.type == "score_model" else label_model)(grader, sample, item, model)
    used = result.tokens.get(grader.model, (0, 0))
    result.tokens[grader.model] = (used[0] + reply.prompt_tokens, used[1] + reply.completion_tokens)
    return score


def _multi(grader: Multi, sample: dict, item: Any, result: GradeResult, tools: dict) -> float:
    for name, sub in grader.graders.items():
        graded = grade(sub, sample, item, **tools)
        result.sub_scores[name] = graded.score
        for kind, message in graded.errors.items():
            result.errors.setdefault(kind, f"{name}: {message}")
        for model, (prompt, completion) in graded.tokens.items():
            used = result.tokens.get(model, (0, 0))
            result.tokens[model] = (used[0] + prompt, used[1] + completion)
    return formula.evaluate(grader.calculate_output, result.sub_scores)


def run_grader(
    grader: Any,
    samples: Sequence[str | dict],
    items: Sequence[Any],
    *,
    model=None,
    embedder=None,
    limits: Limits = Limits(),
    workers: int = 4,
) -> list[GradeResult]:
    """`grade` over a batch, the grader validated once and `workers` samples graded at a time (python graders
    each run in a process; a local grader model batches concurrent questions)."""
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items")
    parsed = validate_grader(grader) if isinstance(grader, dict) else grader
    tools = dict(model=model, embedder=embedder, limits=limits)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pair: grade(parsed, *pair, **tools), zip(samples, items)))
