"""The installed `tuneforge` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# every subcommand of build_parser, in its order
VERBS = [
    "prepare",
    "train",
    "generate",
    "chat",
    "merge",
    "rag",
    "eval",
    "demo",
    "serve",
    "run",
    "sweep",
    "compare",
    "config",
    "feedback",
    "import-openai",
]


def tuneforge(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_help_lists_every_verb():
    import argparse
    import re

    from tuneforge.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(verbs) == VERBS  # a new verb joins this list, and the tests that take every verb
    assert set(VERB_ARGS) == set(VERBS) - {"import-openai"}  # import-openai reads no experiment file: it writes them
    out = tuneforge("--help")
    assert out.returncode == 0
    for verb in VERBS:  # a long name (import-openai) has its help on the next line
        assert re.search(rf"\n    {re.escape(verb)}[ \n]", out.stdout), verb


def test_bad_file_exits_2_lists_problems_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {quantisation: 4bit}\ntrain: {epochs: three, schedule: cosin}\n")
    out = tuneforge("prepare", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert "3 problems" in out.stderr
    for key in ("model.quantisation", "train.epochs", "train.schedule"):
        assert key in out.stderr
    assert "did you mean 'quantization'" in out.stderr
    assert list(tmp_path.iterdir()) == [bad]  # no run directory, nothing written


def test_run_refuses_a_bad_eval_grader_before_it_prepares_or_trains(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\neval: {graders: [{type: string_check, name: m, input: x, reference: y, operation: equals}]}\n"
    )
    out = tuneforge("run", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "eval.graders[0]" in out.stderr and "operation" in out.stderr
    assert list(tmp_path.iterdir()) == [bad]  # no run directory, nothing written


def test_stray_words_and_unknown_options_are_refused():
    for extra in (["oops"], ["--bogus"]):
        out = tuneforge("config", str(REPO / "configs" / "quickstart.yaml"), *extra)
        assert out.returncode == 2 and extra[0] in out.stderr


def test_config_prints_resolved_with_overrides():
    out = tuneforge("config", str(REPO / "configs" / "quickstart.yaml"), "train.lr=5e-5", "seed=3")
    assert out.returncode == 0, out.stderr
    assert "lr: 5.0e-05" in out.stdout and "seed: 3" in out.stdout
    schema = tuneforge("config", "--schema")
    assert json.loads(schema.stdout)["title"] == "Experiment"
    explain = tuneforge("config", "--explain")
    assert "train.max_grad_norm" in explain.stdout


def test_output_piped_to_a_reader_that_stops_early_ends_quietly():
    """`tuneforge config --explain | head -1`: no "error: Broken pipe", no traceback, the exit of a SIGPIPE'd tool."""
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "config", "--explain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader_gone.stdout.close()  # before the first line is written: the explanation (24 kB) cannot fit a lost write
    stderr = reader_gone.stderr.read().decode()
    assert reader_gone.wait(timeout=600) == 141, stderr
    assert stderr == ""


def _tiny_experiment(tmp_path, lines):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: tiny\nseed: 5\ndata: {{train: {data.name}, valid_split: 0.25}}\n")
    return exp


def _chat(i):
    return {
        "messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    }


def test_run_prepares_trains_and_evaluates_into_run_dir_with_config_and_manifest(tmp_path):
    exp = _tiny_experiment(tmp_path, [_chat(i) for i in range(8)])
    out = tuneforge(
        "run",
        str(exp),
        "--run-dir",
        str(tmp_path / "elsewhere"),
        "seed=9",
        "train.max_steps=2",
        "eval.max_new_tokens=8",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run = tmp_path / "elsewhere"
    assert "seed: 9" in (run / "config.yaml").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 9 and manifest["name"] == "tiny"
    assert "torch" in manifest["packages"] and "transformers" in manifest["packages"]
    import torch

    assert manifest["device"]["cuda"] is torch.cuda.is_available() and manifest["device"]["cpu_count"] == os.cpu_count()
    assert manifest["data"]["counts"] == {"train": 6, "valid": 2, "rejected": 0}
    assert len((run / "data" / "train.jsonl").read_text().splitlines()) == 6
    assert str(run) in out.stdout
    assert not (tmp_path / "runs").exists()
    assert (run / "adapter" / "adapter_config.json").exists()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())  # eval ran last, on the 2 valid examples
    assert set(metrics) == {"base", "finetuned"} and metrics["finetuned"]["examples"] == 2
    assert f"eval report: {run / 'eval' / 'report.html'}" in out.stdout


def test_prepare_names_broken_lines_and_writes_no_data(tmp_path):
    exp = _tiny_experiment(
        tmp_path, [_chat(0), "{not json", _chat(2), {"messages": [{"role": "user", "content": "no answer"}]}]
    )
    out = tuneforge("prepare", str(exp), cwd=tmp_path)
    assert out.returncode == 1
    assert "chats.jsonl line 2: [invalid_json]" in out.stderr
    assert "chats.jsonl line 4: [example_missing_assistant_message]" in out.stderr
    assert not (tmp_path / "runs" / "tiny" / "data").exists()


def test_expected_failures_are_one_line_and_a_non_zero_exit(tmp_path):
    """A missing input file, a busy port and a verb that only reads a run: the cause in one line, no traceback,
    and nothing created where there was no run."""
    import socket

    exp = tmp_path / "exp.yaml"
    exp.write_text("name: lonely\nmodel: {ref: builtin:smollm2-135m-instruct}\n")
    out = tuneforge("generate", str(exp), "--input", "missing.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "tuneforge generate: error: no such file or folder: missing.jsonl" in out.stderr
    assert not (tmp_path / "runs").exists()  # a verb that reads a run never creates one

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tuneforge("serve", str(exp), "--port", str(port), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in out.stderr

    (tmp_path / "human.jsonl").write_text('{"messages": [{"role": "human", "content": "hi"}]}\n')
    out = tuneforge("generate", str(exp), "--input", "human.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert out.returncode == 1 and "human.jsonl line 1: [unrecognized_role] message 1 has role 'human'" in out.stderr

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    out = tuneforge(
        "generate", str(exp), "--input", "prompts.jsonl", "--output", "out.jsonl", "--system", "finetuned", cwd=tmp_path
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"no adapter in {tmp_path / 'runs' / 'lonely' / 'adapter'}" in out.stderr  # says where it looked
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.jsonl").exists()


# every verb with the arguments it needs, run against a file that is not there and a run folder that cannot be made
VERB_ARGS = {
    "prepare": [],
    "train": [],
    "generate": ["--input", "p.jsonl", "--output", "o.jsonl"],
    "chat": [],
    "merge": [],
    "rag": ["build"],
    "eval": [],
    "demo": [],
    "serve": ["--port", "0"],
    "run": [],
    "config": [],
    "feedback": [],
    "sweep": [],
    "compare": [],
}


def _one_error_line(out, verb):
    lines = [
        line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("Loading weights", "Batches"))
    ]
    assert out.returncode not in (0, None) and "Traceback" not in out.stderr, (verb, out.stderr[-2000:])
    assert lines and lines[-1].startswith(f"tuneforge {verb}"), (verb, out.stderr[-2000:])
    return lines[-1]


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_every_verb_names_a_missing_experiment_file_in_one_line(tmp_path, verb):
    args = ["build", "gone.yaml"] if verb == "rag" else ["gone.yaml", *VERB_ARGS[verb]]
    out = tuneforge(verb, *args, cwd=tmp_path)
    assert "gone.yaml" in _one_error_line(out, verb)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("verb", ["prepare", "train", "merge", "rag", "eval", "run"])
def test_every_writing_verb_names_a_run_folder_it_cannot_create(tmp_path, verb):
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(_chat(i)) for i in range(4)) + "\n")
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "page.md").write_text("# Page\n\nSome text to index.\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: blocked\ndata: {train: chats.jsonl}\nrag: {corpus: kb}\n")
    (tmp_path / "afile").write_text("a file where the run folder's parent should be")
    args = ["build", str(exp)] if verb == "rag" else [str(exp)]
    out = tuneforge(verb, *args, "--run-dir", str(tmp_path / "afile" / "run"), cwd=tmp_path)
    # every writing verb creates its run folder first, before it reads data or an adapter, so each one fails on the
    # folder itself, naming it (OSError's ENOTDIR, in describe_os_error's words), not on what the run lacks
    assert _one_error_line(out, verb) == f"tuneforge {verb}: error: Not a directory: {tmp_path / 'afile' / 'run'}"
    assert (tmp_path / "afile").read_text() == "a file where the run folder's parent should be"  # left as it was


@pytest.mark.parametrize("verb", ["serve", "chat"])
def test_ctrl_c_ends_a_long_running_verb_in_one_line(tmp_path, verb):
    import signal
    import time

    exp = tmp_path / "exp.yaml"
    exp.write_text("name: waiting\nmodel: {ref: builtin:smollm2-135m-instruct}\n")
    args = ["--port", "0"] if verb == "serve" else ["--system", "base"]
    # SIGINT as a terminal gives it: a runner started in the background (a non-interactive shell's `&`) passes SIGINT
    # on ignored, and Python then installs no KeyboardInterrupt handler at all
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", verb, str(exp), *args],
        cwd=tmp_path,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ready = "serving " if verb == "serve" else "chatting with"
    deadline = time.time() + 300
    seen = ""
    while ready not in seen:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        seen += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # stdin stays open: an EOF must not be what ends the chat
    err = proc.stderr.read()
    # 130, or death by SIGINT itself (-2), which a shell reports as the same 130; the point is one line, no traceback
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == f"tuneforge {verb}: interrupted"
