"""What the feedback says: counts, win rates per pair of systems, a leaderboard, and where voters disagree.

A system is named by its name and, when one name was answered by several models
(`finetuned` before and after a retraining), the first 8 characters of its identity:
`finetuned@3fa2c1d0`.

- **Win rates**: for each pair, A's wins plus half its ties over all their votes, with a
  95% Wilson interval. `both_bad` counts as a tie for the rate and is reported apart.
- **Leaderboard**: Bradley-Terry strengths fitted by minorise-maximise iterations
  (ties as half a win each way, and one virtual tie with every other system so a
  system that never lost still has a finite strength), shown on the Elo scale
  (1000 + 400·log10 of the strength over their geometric mean), with 95% intervals
  from 200 bootstrap resamples of the votes (none below 5 votes: a handful of votes
  resamples to itself and would look certain).
- **Disagreement**: prompts with at least two votes for the same pair, ranked by the
  entropy of their verdicts.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Any

MIN_VOTES_FOR_INTERVAL = 5  # below this a system's bootstrap interval is shown as too few votes


def system_label(answer: dict[str, Any], identities: dict[str, set[str]]) -> str:
    name = answer["system"]
    identity = answer.get("identity") or ""
    return f"{name}@{identity[:8]}" if len(identities.get(name, ())) > 1 and identity else name


def _identities(records: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for r in records:
        for key in ("answer", "left", "right"):
            answer = r.get(key)
            if isinstance(answer, dict) and answer.get("identity"):
                found[answer["system"]].add(answer["identity"])
    return found


def prompt_text(messages: list[dict]) -> str:
    """The last user turn: what a prompt is called in the report."""
    users = [m.get("content") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else ""


def votes(records: list[dict]) -> list[tuple[str, str, float, str, str]]:
    """(a, b, a's score: 1 win, 0.5 tie, 0 loss; verdict; prompt) for each vote between two different systems."""
    identities = _identities(records)
    found = []
    for r in records:
        if r["kind"] != "vote":
            continue
        a, b = system_label(r["left"], identities), system_label(r["right"], identities)
        if a == b:
            continue
        score = {"left": 1.0, "right": 0.0}.get(r["verdict"], 0.5)
        found.append((a, b, score, r["verdict"], prompt_text(r["messages"])))
    return found


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(pairs: list[tuple[str, str, float, str, str]]) -> list[dict[str, Any]]:
    """One row per pair (alphabetical), from the first system's side."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b, score, verdict, _ in pairs:
        key, score = ((a, b), score) if a <= b else ((b, a), 1.0 - score)
        row = table.setdefault(
            key,
            {"a": key[0], "b": key[1], "votes": 0, "a_wins": 0, "b_wins": 0, "ties": 0, "both_bad": 0, "score": 0.0},
        )
        row["votes"] += 1
        row["score"] += score
        if verdict == "both_bad":
            row["both_bad"] += 1
        elif score == 0.5:
            row["ties"] += 1
        elif score == 1.0:
            row["a_wins"] += 1
        else:
            row["b_wins"] += 1
    rows = []
    for row in table.values():
        low, high = wilson(row["score"], row["votes"])
        rows.append(
            {
                **{k: v for k, v in row.items() if k != "score"},
                "a_win_rate": row["score"] / row["votes"],
                "interval": [low, high],
            }
        )
    return sorted(rows, key=lambda r: (r["a"], r["b"]))


def bradley_terry(pairs: list[tuple[str, str, float, str, str]], iterations: int = 500) -> dict[str, float]:
    """Elo-scale ratings (mean 1000 on the log scale) of every system in `pairs`."""
    systems = sorted({s for a, b, *_ in pairs for s in (a, b)})
    if not systems:
        return {}
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for a, b, score, *_ in pairs:
        wins[a] += score
        wins[b] += 1.0 - score
        games[(a, b)] += 1
        games[(b, a)] += 1
    for a in systems:  # one virtual tie with every other system: finite strengths for the unbeaten and the winless
        for b in systems:
            if a != b:  # each ordered pair once: half a win to each side of one game
                wins[a] += 0.5
                games[(a, b)] += 1
    strength = {s: 1.0 for s in systems}
    for _ in range(iterations):
        new = {}
        for a in systems:
            denominator = sum(games[(a, b)] / (strength[a] + strength[b]) for b in systems if b != a and games[(a, b)])
            new[a] = wins[a] / denominator if denominator else strength[a]
        mean = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        new = {s: v / mean for s, v in new.items()}
        done = max(abs(math.log(new[s] / strength[s])) for s in systems) < 1e-9
        strength = new
        if done:
            break
    return {s: 1000 + 400 * math.log10(strength[s]) for s in systems}


def leaderboard(
    pairs: list[tuple[str, str, float, str, str]], resamples: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    ratings = bradley_terry(pairs)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(resamples if pairs else 0):
        drawn = bradley_terry([rng.choice(pairs) for _ in pairs], iterations=200)
        for system in ratings:
            samples[system].append(drawn.get(system, 1000.0))
    counts = Counter(s for a, b, *_ in pairs for s in (a, b))
    rows = []
    for system, rating in sorted(ratings.items(), key=lambda kv: -kv[1]):
        values = sorted(samples[system])
        interval = None  # a handful of votes resamples to itself: no honest interval yet
        if values and counts[system] >= MIN_VOTES_FOR_INTERVAL:
            interval = [values[int(0.025 * len(values))], values[min(len(values) - 1, int(0.975 * len(values)))]]
        rows.append({"system": system, "rating": rating, "interval": interval, "votes": counts[system]})
    return rows


def disagreement(pairs: list[tuple[str, str, float, str, str]], top: int = 10) -> list[dict[str, Any]]:
    """Prompts whose votes for one pair of systems split, most split first."""
    by_prompt: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for a, b, score, _, prompt in pairs:
        key, score = ((prompt, a, b), score) if a <= b else ((prompt, b, a), 1.0 - score)
        by_prompt[key].append(score)
    rows = []
    for (prompt, a, b), scores in by_prompt.items():
        if len(scores) < 2:
            continue
        shares = Counter(scores)
        entropy = -sum(c / len(scores) * math.log2(c / len(scores)) for c in shares.values())
        if entropy > 0:
            rows.append(
                {
                    "prompt": prompt,
                    "a": a,
                    "b": b,
                    "votes": len(scores),
                    "entropy": entropy,
                    "a_wins": shares[1.0],
                    "ties": shares[0.5],
                    "b_wins": shares[0.0],
                }
            )
    return sorted(rows, key=lambda r: (-r["entropy"], -r["votes"], r["prompt"]))[:top]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = Counter(r["kind"] for r in records)
    thumbs: dict[str, Counter] = defaultdict(Counter)
    identities = _identities(records)
    for r in records:
        if r["kind"] == "thumb":
            thumbs[system_label(r["answer"], identities)][r["value"]] += 1
    pairs = votes(records)
    return {
        "records": len(records),
        "by_kind": {k: kinds.get(k, 0) for k in ("thumb", "correction", "vote", "contribution")},
        "thumbs": {s: {"up": c["up"], "down": c["down"]} for s, c in sorted(thumbs.items())},
        "logins": sorted({r["login"] for r in records if r.get("login")}),
        "win_rates": win_rates(pairs),
        "leaderboard": leaderboard(pairs),
        "disagreement": disagreement(pairs),
    }


def markdown(summary: dict[str, Any]) -> str:
    kinds = summary["by_kind"]
    lines = [
        f"# Feedback: {summary['records']} records",
        "",
        f"{kinds['thumb']} thumbs, {kinds['correction']} corrections, {kinds['vote']} votes, "
        f"{kinds['contribution']} contributed examples"
        + (f"; from {len(summary['logins'])} logins" if summary["logins"] else ""),
        "",
    ]
    if summary["leaderboard"]:
        lines += [
            "## Leaderboard (Bradley-Terry, Elo scale, 95% bootstrap interval)",
            "",
            "| system | rating | interval | votes |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['system']} | {r['rating']:.0f} | "
            + (
                f"{r['interval'][0]:.0f}–{r['interval'][1]:.0f}"
                if r["interval"]
                else f"too few votes (<{MIN_VOTES_FOR_INTERVAL})"
            )
            + f" | {r['votes']} |"
            for r in summary["leaderboard"]
        ]
        lines += [
            "",
            "## Win rates",
            "",
            "| A | B | votes | A wins | B wins | ties | both bad | A's win rate (95% CI) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['a']} | {r['b']} | {r['votes']} | {r['a_wins']} | {r['b_wins']} | {r['ties']} | {r['both_bad']} | "
            f"{r['a_win_rate']:.2f} ({r['interval'][0]:.2f}–{r['interval'][1]:.2f}) |"
            for r in summary["win_rates"]
        ]
    if summary["thumbs"]:
        lines += ["", "## Thumbs", "", "| system | up | down |", "| --- | --- | --- |"]
        lines += [f"| {s} | {c['up']} | {c['down']} |" for s, c in summary["thumbs"].items()]
    if summary["disagreement"]:
        lines += [
            "",
            "## Where voters disagree",
            "",
            "| prompt | A | B | votes | A wins / ties / B wins |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['prompt'][:80].replace('|', '/')} | {r['a']} | {r['b']} | {r['votes']} | "
            f"{r['a_wins']} / {r['ties']} / {r['b_wins']} |"
            for r in summary["disagreement"]
        ]
    return "\n".join(lines) + "\n"
