"""LLM-as-judge: pairwise comparison of two systems' answers, asked in both orders.

A judge model prefers the first or the second answer more often than their content
warrants (position bias). Each pair is asked twice with the answers swapped; a
system wins an example only when the two verdicts together favour it, and a split
or a "tie" is a tie.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tuneforge.eval.scores import bootstrap_interval

SYSTEM_PROMPT = "You are an impartial judge. You compare two answers to the same question and say which is better."
# The judge is asked to end with "Verdict: A", "Verdict: B" or "Verdict: tie". Only that line, or a reply that is
# nothing but the verdict ("B", "**Answer A**", "Tie."), counts: a search for a bare a/b would read the article in
# "It's a tie" as a vote for A.
VERDICT_LINE = re.compile(r"verdict\s*[:=\-]?\s*[*_`\"'(\[]*\s*(?:answer\s+)?(a|b|tie)\b", re.I)
BARE = re.compile(r"^[\s*_`\"'(\[]*(?:(?:answer\s+)?(a|b)|(tie|it'?s a tie|draw|equal))[\s*_`\"')\].!]*$", re.I)


def judge_prompt(rubric: str, question: str, reference: str | None, first: str, second: str) -> list[dict]:
    reference_part = f"[Reference answer]\n{reference}\n\n" if reference else ""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": f"{rubric}\n\n[Question]\n{question}\n\n{reference_part}"
            f"[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
            'End your reply with one line: "Verdict: A" if answer A is better, "Verdict: B" if answer B is '
            'better, or "Verdict: tie".',
        },
    ]


def read_verdict(text: str) -> str:
    """'A', 'B' or 'tie' from the judge's reply: its last "Verdict: ..." line, or a reply that is only a verdict.
    Anything else ("both are fine", "B is slightly better but A is shorter") decides nothing: a tie."""
    found = VERDICT_LINE.findall(text)
    if found:
        word = found[-1].lower()
        return "tie" if word == "tie" else word.upper()
    bare = BARE.match(text.strip())
    if bare:
        return bare.group(1).upper() if bare.group(1) else "tie"
    return "tie"


@dataclass
class PairResult:
    first: str
    second: str
    outcomes: list[float]  # per example, for `first`: 1 win, 0.5 tie, 0 loss
    verdicts: list[tuple[str, str]]  # (first shown as A, first shown as B)

    def summary(self, seed: int) -> dict:
        outcomes = np.array(self.outcomes)
        low, high = bootstrap_interval(outcomes, seed)
        return {
            "first": self.first,
            "second": self.second,
            "wins": int((outcomes == 1).sum()),
            "ties": int((outcomes == 0.5).sum()),
            "losses": int((outcomes == 0).sum()),
            "win_rate": float(outcomes.mean()) if len(outcomes) else None,
            "win_rate_low": low,
            "win_rate_high": high,
        }


def compare(
    ask: Callable[[list[list[dict]]], list[str]],
    rubric: str,
    questions: list[str],
    references: list[str | None],
    first_name: str,
    first: list[str],
    second_name: str,
    second: list[str],
) -> PairResult:
    """Ask `ask` (the judge: chats in, replies out) about every example in both orders."""
    shown_first = [judge_prompt(rubric, q, r, a, b) for q, r, a, b in zip(questions, references, first, second)]
    shown_second = [judge_prompt(rubric, q, r, b, a) for q, r, a, b in zip(questions, references, first, second)]
    replies = ask(shown_first + shown_second)
    n = len(questions)
    outcomes, verdicts = [], []
    for forward, backward in zip(replies[:n], replies[n:]):
        v1, v2 = read_verdict(forward), read_verdict(backward)
        score = {"A": 1, "B": -1, "tie": 0}[v1] + {"A": -1, "B": 1, "tie": 0}[v2]
        outcomes.append(1.0 if score > 0 else 0.0 if score < 0 else 0.5)
        verdicts.append((v1, v2))
    return PairResult(first_name, second_name, outcomes, verdicts)
