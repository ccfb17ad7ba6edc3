"""`train.backend: openai` against `tuneforge serve`'s own fine-tuning endpoints, on loopback.

The server trains every job with the builtin SmolLM2, unquantized, for 3 steps of one 128-token row (overrides on its
command line), so the whole module runs on CPU in a few minutes. Both sides are real:
the official `openai` client, our server, our trainer.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.live import answers_models, free_port, running

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
KEY = f"sk-test-{secrets.token_hex(16)}"
CONVERSATIONS = REPO / "examples" / "data" / "support" / "conversations.jsonl"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    env["OPENAI_API_KEY"] = KEY
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openai-backend")


@pytest.fixture(scope="module")
def server(workdir, smollm_location):
    with _serve(workdir, "server", "train.max_steps=3") as client:
        yield client


def _experiment(workdir: Path, client, name: str, sample: int = 16, seed: int = 42) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(f"""
name: {name}
seed: {seed}
data:
  train: {CONVERSATIONS}
  sample: {sample}
  valid_split: 0.25
  max_length: 512
train:
  backend: openai
  base_url: {client.base_url}
  model: base
  epochs: 1
  batch_size: 1
  lr_multiplier: 1.0
  suffix: support
  poll_seconds: 0.5
""")
    return path


def _train(path: Path, run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(path), "--run-dir", str(run_dir), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def _jobs_of(client, name: str) -> list:
    return [
        j for j in client.fine_tuning.jobs.list(limit=100) if (j.metadata or {}).get("tuneforge_experiment") == name
    ]


# `seconds` guards against a hang; it is no pace: on a busy 2-core machine one training step can take minutes
def _wait(client, job_id: str, statuses: tuple[str, ...], seconds: float = 600):
    deadline = time.time() + seconds
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.time() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.5)
    return job


@pytest.fixture(scope="module")
def trained(workdir, server):
    """One end-to-end `tuneforge train --yes`, shared by the tests that look at its results."""
    path = _experiment(workdir, server, "support")
    started = time.perf_counter()
    result = _train(path, workdir / "client", "--yes")
    print(f"backend job end to end: {time.perf_counter() - started:.1f} s")
    return path, workdir / "client", result


def test_train_runs_the_job_end_to_end(trained, server):
    _, run_dir, result = trained
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((run_dir / "openai_job.json").read_text())
    assert state["status"] == "succeeded"
    assert state["fine_tuned_model"].startswith("ft:smollm2-135m-instruct:tuneforge:support:")
    assert state["training_file"].startswith("file-") and state["validation_file"].startswith("file-")
    assert state["checkpoints"] and state["checkpoints"][0]["model"].startswith(state["fine_tuned_model"])
    assert "OpenAI fine-tuning estimate" in result.stdout and "billed tokens" in result.stdout
    assert "Fine-tuning job started" in result.stdout and "Step 3/3" in result.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval_loss" in m for m in metrics)
    job = server.fine_tuning.jobs.retrieve(state["job_id"])
    assert job.method.supervised.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 1
    assert job.seed == 42 and job.trained_tokens > 0
    assert json.loads((run_dir / "manifest.json").read_text())["openai_job"]["status"] == "succeeded"


def test_the_fine_tuned_model_answers(trained, server):
    model = json.loads((trained[1] / "openai_job.json").read_text())["fine_tuned_model"]
    assert model in [m.id for m in server.models.list().data]
    reply = server.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What comes in the box with the K2?"}], max_tokens=24
    )
    assert reply.model == model and reply.choices[0].message.content.strip()


def test_running_train_again_reattaches(trained, server):
    path, run_dir, first = trained
    assert first.returncode == 0
    again = _train(path, run_dir)  # no --yes and no terminal: only a new job would need confirming
    assert again.returncode == 0, again.stderr[-3000:]
    assert "re-attached to job" in again.stdout and "already succeeded" in again.stdout
    assert len(_jobs_of(server, "support")) == 1


def test_a_file_that_fails_validation_fails_the_job(server, tmp_path):
    good = CONVERSATIONS.read_text().splitlines()[:12]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(good[:3] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + good[3:]) + "\n")
    uploaded = server.files.create(file=broken.open("rb"), purpose="fine-tune")
    assert server.files.retrieve(uploaded.id).filename == "broken.jsonl"
    job = server.fine_tuning.jobs.create(model="base", training_file=uploaded.id)
    job = _wait(server, job.id, ("failed",), 60)
    assert job.error.param == "training_file" and job.error.code == "invalid_file_format"
    assert "broken.jsonl line 4" in job.error.message and "example_missing_assistant_message" in job.error.message
    with pytest.raises(openai.BadRequestError) as info:
        server.fine_tuning.jobs.create(model="gpt-nope", training_file=uploaded.id)
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        server.fine_tuning.jobs.retrieve("ftjob-nope")


def test_the_backend_shows_a_failed_jobs_error(workdir, server):
    path = _experiment(workdir, server, "too-few", sample=6)  # 5 training examples: the server wants 10, as OpenAI does
    result = _train(path, workdir / "too-few", "--yes")
    assert result.returncode == 1
    assert "failed: [invalid_n_examples]" in result.stderr and "(param: training_file)" in result.stderr
    assert json.loads((workdir / "too-few" / "openai_job.json").read_text())["error"]["code"] == "invalid_n_examples"


def test_no_terminal_and_no_yes_is_refused(workdir, server):
    path = _experiment(workdir, server, "unconfirmed", seed=3)
    result = _train(path, workdir / "unconfirmed")
    assert result.returncode == 2 and "--yes" in result.stderr
    assert not _jobs_of(server, "unconfirmed") and not (workdir / "unconfirmed" / "openai_job.json").exists()


@contextmanager
def _serve(workdir: Path, name: str, *overrides: str) -> Iterator[openai.OpenAI]:
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    args = [
        "serve",
        str(REPO / "configs" / "quickstart.yaml"),
        "--port",
        str(port),
        "--run-dir",
        str(workdir / name),
        "model.quantization=none",
        "data.max_length=128",
        *overrides,
    ]
    with running(args, workdir, answers_models(client), env=_env()):
        yield client


def test_ctrl_c_leaves_the_job_running_and_cancel_cancels_it(workdir, smollm_location, tmp_path):
    # A server without the step cap, and two 50-epoch jobs ahead of ours: the first trains for many minutes and the
    # second waits behind it, so the backend's job stays queued however slow the machine is (with the 3-step cap the
    # jobs ahead could finish before the interrupt and the cancel).
    with _serve(workdir, "held-server") as held:
        upload = held.files.create(file=CONVERSATIONS.open("rb"), purpose="fine-tune")
        ahead = [
            held.fine_tuning.jobs.create(model="base", training_file=upload.id, hyperparameters={"n_epochs": 50})
            for _ in range(2)
        ]
        path = _experiment(workdir, held, "interrupted", seed=7)
        run_dir = workdir / "interrupted"
        # SIGINT as a terminal's Ctrl-C gives it, even when the test runner was started in the background, where a
        # non-interactive shell passes SIGINT on ignored and Python installs no KeyboardInterrupt handler
        # output to files, read while it runs (a pipe nobody reads can fill and block the process)
        out_path, err_path = tmp_path / "train.out", tmp_path / "train.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tuneforge", "train", str(path), "--run-dir", str(run_dir), "--yes"],
                stdout=out,
                stderr=err,
                text=True,
                env=_env(),
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        # Ctrl-C while it watches the job: the first event it prints comes from inside the watch loop, whose handler
        # is what leaves the job running (the state file gets the job id a moment before the loop starts)
        created = re.compile(r"^\[\d\d:\d\d:\d\d\] Created fine-tuning job: (ftjob-\S+)$", re.M)
        deadline = time.time() + 300
        while not (watching := created.search(out_path.read_text())):
            assert proc.poll() is None and time.time() < deadline, (out_path.read_text(), err_path.read_text()[-3000:])
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = err_path.read_text()
        assert proc.returncode in (130, -signal.SIGINT), err  # both are 130 to a shell (see test_cli's Ctrl-C test)
        assert "keeps running" in err and "--cancel" in err
        job_id = json.loads((run_dir / "openai_job.json").read_text())["job_id"]
        assert job_id == watching.group(1)
        assert held.fine_tuning.jobs.retrieve(job_id).status in ("validating_files", "queued")
        _wait(held, ahead[0].id, ("running",))
        deadline = time.time() + 600  # the estimate comes after its first step: a hang guard, not a pace
        while (running_job := held.fine_tuning.jobs.retrieve(ahead[0].id)).estimated_finish is None:
            assert time.time() < deadline, "a running job never got an estimated_finish"
            time.sleep(0.5)
        # a running job's estimate is a time still ahead, not a duration or a time already past (its steps left, at
        # the pace of those done, after now); the estimate is cleared once it is cancelled, below
        assert running_job.status == "running" and running_job.estimated_finish > time.time()
        with pytest.raises(openai.BadRequestError, match="in use"):
            held.files.delete(upload.id)

        cancelled = _train(path, run_dir, "--cancel")
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"cancelled job {job_id}" in cancelled.stdout
        assert held.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
        assert json.loads((run_dir / "openai_job.json").read_text())["status"] == "cancelled"
        assert "The job was cancelled" in [e.message for e in held.fine_tuning.jobs.list_events(job_id)]
        for job in reversed(ahead):  # the queued one, then the one training, which stops at its next step
            assert held.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert held.fine_tuning.jobs.retrieve(ahead[0].id).estimated_finish is None
        deadline = time.time() + 600  # it stops at its next step, which on a busy CPU can take minutes
        stopped = "Training stopped: the job was cancelled"
        while stopped not in [e.message for e in held.fine_tuning.jobs.list_events(ahead[0].id)]:
            assert time.time() < deadline, "the cancelled job kept training"
            time.sleep(0.5)
        assert held.files.content(upload.id).read() == CONVERSATIONS.read_bytes()
        assert held.files.delete(upload.id).deleted  # no unfinished job needs it any more


def test_the_api_key_is_written_nowhere(trained, workdir):
    assert trained[2].returncode == 0
    for path in workdir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in trained[2].stdout + trained[2].stderr
