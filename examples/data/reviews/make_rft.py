"""Write rft.jsonl: review sentiment as OpenAI reinforcement fine-tuning data, from reviews.csv.

Each line is a prompt (a developer instruction and the review as the user's turn, no answer) with the known
`sentiment` beside it, which a string_check grader compares with the model's answer:

    {"messages": [{"role": "developer", "content": "..."}, {"role": "user", "content": "..."}], "sentiment": "positive"}

The first 32 clean rows (a review, a sentiment, no HTML entity), in table order. Run `python make_rft.py` to
write rft.jsonl next to this script; it reproduces the file byte for byte.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Classify the sentiment of the product review. Answer with one word: positive or negative."
LINES = 32


def main() -> None:
    lines = []
    with open(HERE / "reviews.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            review, sentiment = " ".join(row["review"].split()), row["sentiment"].strip()
            if not review or sentiment not in ("positive", "negative") or "&" in review:
                continue
            messages = [{"role": "developer", "content": INSTRUCTION}, {"role": "user", "content": review}]
            lines.append(json.dumps({"messages": messages, "sentiment": sentiment}, ensure_ascii=False))
            if len(lines) == LINES:
                break
    (HERE / "rft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
