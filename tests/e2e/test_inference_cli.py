"""`tuneforge generate` and `tuneforge chat` as a user runs them, on the builtin model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_generate_answers_prompt_and_messages_lines(tmp_path, smollm_location):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "What is the capital of France?"})
        + "\n"
        + json.dumps(
            {
                "id": "b",
                "messages": [
                    {"role": "user", "content": "What is the capital of Japan?"},
                    {"role": "assistant", "content": "ref"},
                ],
            }
        )
        + "\n"
        + json.dumps({"id": "c", "prompt": "What is the capital of Germany?"})
        + "\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "generate",
            QUICKSTART,
            "--run-dir",
            str(tmp_path / "run"),
            "--input",
            str(prompts),
            "--output",
            str(tmp_path / "answers.jsonl"),
            "--max-new-tokens",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", "b", "c"] and all(a["system"] == "base" for a in answers)
    assert "Paris" in answers[0]["answer"] and "Tokyo" in answers[1]["answer"] and "Berlin" in answers[2]["answer"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "generate",
            QUICKSTART,
            "--run-dir",
            str(tmp_path / "run"),
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "never.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "bad.jsonl line 2" in out.stderr and not (tmp_path / "never.jsonl").exists()


def test_terminal_chat_streams_and_handles_commands(tmp_path, smollm_location):
    script = (
        "What is the capital of France?\n/model finetuned\n/system Answer in one word.\n/system\n/system off\n/reset\n"
        "What is the capital of Japan?\n/exit\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "chat", QUICKSTART, "--run-dir", str(tmp_path / "run")],
        input=script,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout
    assert "base> " in lines and "Paris" in lines and "Tokyo" in lines
    assert "no adapter" in lines  # /model finetuned before training: explained, chat goes on
    assert (
        "(no system prompt)" in lines
    )  # nothing was prepared in this run, so there is no training prompt to start with
    assert (
        "(system prompt set)" in lines
        and "(system prompt: 'Answer in one word.')" in lines
        and "(system prompt off)" in lines
    )
    assert "(conversation cleared)" in lines
