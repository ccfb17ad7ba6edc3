"""Build preferences.jsonl: OpenAI-format preference pairs from the shipped support conversations.

The preferred output is the conversation's own answer. The non-preferred one is a
deflection that sends the customer away without the fact they asked for (every
third pair: the answer to a different question, fluent but off-topic). A model
tuned on these should keep answering from what it knows instead of deflecting.

    python examples/data/support/make_preferences.py   # rewrites preferences.jsonl (seeded)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFLECTIONS = [
    "I'm not able to help with that. Please contact Kestrel Home support.",
    "That depends on your setup. Please check the manual or reach out to support for details.",
    "I'd recommend contacting a licensed HVAC technician about this.",
    "Sorry, I don't have information about that. Please visit the Kestrel website.",
    "Please try restarting the thermostat and contact support if the issue continues.",
]


def main(count: int = 120, seed: int = 7) -> None:
    rng = random.Random(seed)
    conversations = [
        json.loads(line)["messages"] for line in (HERE / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    chosen = rng.sample(range(len(conversations)), min(count, len(conversations)))
    lines = []
    for n, index in enumerate(chosen):
        messages = conversations[index]
        if n % 3 == 2:
            other = conversations[rng.choice([i for i in range(len(conversations)) if i != index])]
            worse = other[-1]["content"]
        else:
            worse = rng.choice(DEFLECTIONS)
        lines.append(
            {
                "input": {"messages": messages[:-1]},
                "preferred_output": [messages[-1]],
                "non_preferred_output": [{"role": "assistant", "content": worse}],
            }
        )
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    (HERE / "preferences.jsonl").write_text(text, encoding="utf-8")
    print(f"{len(lines)} pairs written to {HERE / 'preferences.jsonl'}")


if __name__ == "__main__":
    main()
