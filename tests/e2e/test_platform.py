"""`tuneforge serve` as an OpenAI fine-tuning platform, driven by the official `openai` client on loopback, with keys.

One server (the builtin SmolLM2, unquantized, 128-token rows, every job 3 steps long with a checkpoint at each)
trains real jobs: supervised with pause and resume, the same job uninterrupted for comparison, DPO continuing from
the first job's model, and a job whose server is killed with SIGKILL and started again. Every body is checked against
the openai package's own types (tests/wire.py). The wandb integration logs for real, offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import FileObject
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.fine_tuning import FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.live import answers_models, free_port, running
from tests.wire import checked, checked_job, checked_page

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
CONVERSATIONS = REPO / "examples" / "data" / "support" / "conversations.jsonl"
PREFERENCES = REPO / "examples" / "data" / "support" / "preferences.jsonl"
RFT = REPO / "examples" / "data" / "reviews" / "rft.jsonl"
SENTIMENT = {
    "type": "string_check",
    "name": "sentiment",
    "input": "{{sample.output_text}}",
    "reference": "{{item.sentiment}}",
    "operation": "ilike",
}
ALICE, BOB = f"sk-alice-{os.urandom(12).hex()}", f"sk-bob-{os.urandom(12).hex()}"
STEPS = 3


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TUNEFORGE_API_KEYS", "WANDB_"))}
    env.update(
        TUNEFORGE_API_KEYS=f"alice:{ALICE},bob:{BOB}", WANDB_MODE="offline", WANDB_DIR=str(workdir), WANDB_SILENT="true"
    )
    return env


class Server:
    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.alice = openai.OpenAI(base_url=self.url, api_key=ALICE, max_retries=0, timeout=120)
        self.bob = openai.OpenAI(base_url=self.url, api_key=BOB, max_retries=0, timeout=120)

    def start(self):
        args = [
            "serve",
            str(REPO / "configs" / "quickstart.yaml"),
            "--port",
            str(self.port),
            "--run-dir",
            str(self.workdir / "server"),
            "model.quantization=none",
            "data.max_length=128",
            f"train.max_steps={STEPS}",
            "train.save_every=1",
            "train.keep_checkpoints=8",
            "train.grpo.max_completion_tokens=8",  # reinforcement jobs: a sentiment is a word or two
        ]
        return running(args, self.workdir, answers_models(self.alice), env=_env(self.workdir))

    def raw(self, method: str, path: str, key: str = ALICE, **kwargs) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120, **kwargs
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm_location):
    server = Server(tmp_path_factory.mktemp("platform"))
    with server.start() as proc:
        server.proc = proc
        yield server


def _upload(server: Server, path: Path, lines: int, skip: int = 0) -> str:
    data = "".join(path.read_text().splitlines(keepends=True)[skip : skip + lines]).encode()
    response = server.raw("POST", "/files", data={"purpose": "fine-tune"}, files={"file": (path.name, data)})
    assert response.status_code == 200, response.text
    return checked(FileObject, response.json()).id


# `seconds` guards against a hang; it is no pace: on a busy 2-core machine one training step can take minutes
def _wait(server: Server, job_id: str, statuses: tuple[str, ...], seconds: float = 600) -> dict:
    deadline = time.time() + seconds
    while (job := server.raw("GET", f"/fine_tuning/jobs/{job_id}").json())["status"] not in statuses:
        assert job["status"] not in ("failed", "cancelled") or job["status"] in statuses, job
        assert time.time() < deadline, f"{job_id} still {job['status']}"
        time.sleep(0.1)
    checked_job(job)
    return job


def _events(server: Server, job_id: str) -> list[str]:
    body = server.raw("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 200}).json()
    return [e.message for e in reversed(checked_page(FineTuningJobEvent, body))]  # oldest first


def _adapter(server: Server, job_id: str) -> dict:
    from safetensors.torch import load_file

    return load_file(server.workdir / "server" / "api" / "jobs" / job_id / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def files(server):
    return _upload(server, CONVERSATIONS, 24), _upload(server, CONVERSATIONS, 12, skip=24)


@pytest.fixture(scope="module")
def paused_job(server, files):
    """A supervised job paused at its first step, then resumed to the end; with the wandb integration."""
    training, validation = files
    body = {
        "model": "base",
        "training_file": training,
        "validation_file": validation,
        "seed": 7,
        "suffix": "support",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        "integrations": [{"type": "wandb", "wandb": {"project": "tuneforge-test", "tags": ["e2e"]}}],
        "metadata": {"case": "pause"},
    }
    job = checked_job(server.raw("POST", "/fine_tuning/jobs", json=body).json())
    _wait(server, job.id, ("running",))
    assert server.raw("POST", f"/fine_tuning/jobs/{job.id}/pause").status_code == 200
    paused = _wait(server, job.id, ("paused",))
    assert paused["status"] == "paused" and paused["estimated_finish"] is None
    assert "request" not in paused  # the pending pause lives in the store, not on the job object
    checkpoints = server.raw("GET", f"/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [1]
    resumed = server.raw("POST", f"/fine_tuning/jobs/{job.id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] in ("queued", "running")
    return _wait(server, job.id, ("succeeded",))


def test_pause_stops_at_a_checkpoint_and_resume_finishes_the_job(server, paused_job):
    events = _events(server, paused_job["id"])
    assert "Fine-tuning job paused after step 1; resume continues from its checkpoint" in events
    assert "Fine-tuning job resumed from its checkpoint at step 1" in events
    assert events[-1] == "The job has successfully completed"
    assert paused_job["fine_tuned_model"].startswith("ft:smollm2-135m-instruct:tuneforge:support:")
    assert paused_job["trained_tokens"] > 0 and paused_job["finished_at"] >= paused_job["created_at"]
    assert paused_job["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 4,
        "learning_rate_multiplier": "auto",
    }


def test_a_resumed_job_ends_where_an_uninterrupted_one_does(server, files, paused_job):
    training, validation = files
    body = {
        "model": "base",
        "training_file": training,
        "validation_file": validation,
        "seed": 7,
        "suffix": "support",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4},
    }
    straight = _wait(server, server.raw("POST", "/fine_tuning/jobs", json=body).json()["id"], ("succeeded",))
    a, b = _adapter(server, paused_job["id"]), _adapter(server, straight["id"])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_each_checkpoint_is_a_model_and_the_result_file_has_the_step_metrics(server, paused_job):
    body = server.raw("GET", f"/fine_tuning/jobs/{paused_job['id']}/checkpoints").json()
    checkpoints = checked_page(FineTuningJobCheckpoint, body)
    assert [c.step_number for c in checkpoints] == list(range(STEPS, 0, -1))  # newest first
    assert all(
        c.fine_tuned_model_checkpoint == f"{paused_job['fine_tuned_model']}:ckpt-step-{c.step_number}"
        for c in checkpoints
    )
    assert checkpoints[0].metrics.train_loss > 0 and checkpoints[0].metrics.valid_loss > 0
    models = [m.id for m in server.alice.models.list()]
    assert paused_job["fine_tuned_model"] in models and checkpoints[-1].fine_tuned_model_checkpoint in models
    reply = server.raw(
        "POST",
        "/chat/completions",
        json={
            "model": checkpoints[-1].fine_tuned_model_checkpoint,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Does the K2 work with Alexa?"}],
        },
    )
    completion = checked(ChatCompletion, reply.json())
    assert completion.model == checkpoints[-1].fine_tuned_model_checkpoint and completion.choices[0].message.content

    (result,) = paused_job["result_files"]
    meta = checked(FileObject, server.raw("GET", f"/files/{result}").json())
    assert meta.purpose == "fine-tune-results" and meta.filename == "step_metrics.csv"
    rows = server.alice.files.content(result).read().decode().splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, STEPS + 1))  # the steps before the pause too


def test_the_wandb_integration_logged_offline(server, paused_job):
    assert paused_job["integrations"] == [{"type": "wandb", "wandb": {"project": "tuneforge-test", "tags": ["e2e"]}}]
    assert any(
        m.startswith("Logging to Weights & Biases project tuneforge-test") for m in _events(server, paused_job["id"])
    )
    runs = list((server.workdir / "wandb").glob(f"offline-run-*-{paused_job['id']}"))
    assert runs and any(p.suffix == ".wandb" and p.stat().st_size > 0 for r in runs for p in r.iterdir())


def test_dpo_continues_from_a_fine_tuned_model(server, paused_job):
    pairs = _upload(server, PREFERENCES, 12)
    body = {
        "model": paused_job["fine_tuned_model"],
        "training_file": pairs,
        "suffix": "dpo",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
    }
    created = checked_job(server.raw("POST", "/fine_tuning/jobs", json=body).json())
    assert created.method.type == "dpo" and created.method.dpo.hyperparameters.beta == 0.2
    job = _wait(server, created.id, ("succeeded", "failed"))
    assert job["status"] == "succeeded", job["error"]
    start, tuned = _adapter(server, paused_job["id"]), _adapter(server, job["id"])
    # moved from that adapter
    assert start.keys() == tuned.keys() and any((start[k] - tuned[k]).abs().max() > 0 for k in start)
    assert any("(dpo)" in m for m in _events(server, job["id"]))
    # the server's train.max_steps sets every job's step count
    assert [
        c["step_number"] for c in server.raw("GET", f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    ] == list(range(STEPS, 0, -1))
    reply = server.alice.chat.completions.create(
        model=job["fine_tuned_model"],
        max_tokens=8,
        messages=[{"role": "user", "content": "my thermostat restarted at 3am"}],
    )
    assert reply.choices[0].message.content


@pytest.fixture(scope="module")
def rft_job(server):
    """A reinforcement job (GRPO with the job's grader) paused after its first step, then resumed to the end."""
    body = {
        "model": "o4-mini-2025-04-16",
        "training_file": _upload(server, RFT, 12),
        "validation_file": _upload(server, RFT, 4, skip=28),
        "seed": 3,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": SENTIMENT,
                "hyperparameters": {"batch_size": 2, "compute_multiplier": 0.5, "eval_samples": 2},
            },
        },
    }
    job = checked_job(server.raw("POST", "/fine_tuning/jobs", json=body).json())
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.name == "sentiment"
    _wait(server, job.id, ("running",))
    assert server.raw("POST", f"/fine_tuning/jobs/{job.id}/pause").status_code == 200
    _wait(server, job.id, ("paused",))
    assert server.raw("POST", f"/fine_tuning/jobs/{job.id}/resume").status_code == 200
    return _wait(server, job.id, ("succeeded",))


def test_a_reinforcement_job_trains_on_its_graders_reward_with_pause_checkpoints_and_reward_columns(server, rft_job):
    events = _events(server, rft_job["id"])
    assert "Fine-tuning job resumed from its checkpoint at step 1" in events
    assert events[-1] == "The job has successfully completed"
    assert any(e.startswith("Training builtin:smollm2-135m-instruct (reinforcement)") for e in events)
    assert any("train reward mean=" in e for e in events)  # each logged step says its mean reward
    assert rft_job["fine_tuned_model"].startswith("ft:smollm2-135m-instruct:tuneforge::")
    hyperparameters = rft_job["method"]["reinforcement"]["hyperparameters"]
    assert (hyperparameters["batch_size"], hyperparameters["compute_multiplier"]) == (2, 0.5)

    run = server.workdir / "server" / "api" / "jobs" / rft_job["id"]
    summary = json.loads((run / "manifest.json").read_text())["train"]
    assert summary["method"] == "grpo" and summary["grader"] == SENTIMENT and summary["generations"] == 2
    assert summary["graded"] > 0 and summary["grader_errors"] == 0
    train_lines = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert {"messages", "sentiment"} == set(train_lines[0])  # the line as uploaded: its fields are the item

    body = server.raw("GET", f"/fine_tuning/jobs/{rft_job['id']}/checkpoints").json()
    checkpoints = checked_page(FineTuningJobCheckpoint, body)
    assert [c.step_number for c in checkpoints] == list(range(STEPS, 0, -1))
    rows = server.alice.files.content(rft_job["result_files"][0]).read().decode().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["step", "train_loss", "train_reward_mean", "train_reward_std"]
    assert {"train_reward_sentiment", "kl", "completion_length", "valid_reward_mean"} <= set(header)
    steps = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert [int(r["step"]) for r in steps] == list(range(1, STEPS + 1))
    assert all(0 <= float(r["train_reward_mean"]) <= 1 for r in steps)


def test_the_graders_endpoints_answer_as_openais_and_a_bad_grader_is_a_400_naming_its_field(server):
    from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse

    valid = server.raw("POST", "/fine_tuning/alpha/graders/validate", json={"grader": SENTIMENT})
    assert checked(GraderValidateResponse, valid.json()).grader.name == "sentiment"
    run = {"grader": SENTIMENT, "model_sample": "Mostly NEGATIVE", "item": {"sentiment": "negative"}}
    result = checked(GraderRunResponse, server.raw("POST", "/fine_tuning/alpha/graders/run", json=run).json())
    assert result.reward == 1.0 and not any(result.metadata.errors.model_dump().values())
    miss = server.raw("POST", "/fine_tuning/alpha/graders/run", json={**run, "item": {}}).json()
    assert checked(GraderRunResponse, miss).reward == 0.0
    # a score_model grader asks a served model by name; a name nothing serves is that sample's server error
    asking = {
        "type": "score_model",
        "name": "judge",
        "model": "base",
        "input": [{"role": "user", "content": "Rate 0 to 1: {{sample.output_text}}"}],
        "range": [0, 1],
    }
    judged = server.raw("POST", "/fine_tuning/alpha/graders/run", json={**run, "grader": asking}).json()
    assert checked(GraderRunResponse, judged).metadata.type == "score_model"
    unknown = {**run, "grader": {**asking, "model": "no-such-model"}}
    failed = checked(GraderRunResponse, server.raw("POST", "/fine_tuning/alpha/graders/run", json=unknown).json())
    assert failed.reward == 0.0 and failed.metadata.errors.api_model_grader_server_error

    bad = {**SENTIMENT, "operation": "equals"}
    refused = server.raw("POST", "/fine_tuning/alpha/graders/validate", json={"grader": bad})
    assert refused.status_code == 400 and "operation" in refused.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="operation"):
        server.alice.fine_tuning.jobs.create(
            model="base",
            training_file=_upload(server, RFT, 12),
            method={"type": "reinforcement", "reinforcement": {"grader": bad}},
        )
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        server.alice.fine_tuning.jobs.create(
            model="base",
            training_file=_upload(server, RFT, 12),
            method={
                "type": "reinforcement",
                "reinforcement": {"grader": SENTIMENT, "hyperparameters": {"reasoning_effort": "high"}},
            },
        )


def test_the_readmes_rft_client_code_runs_unchanged(server, rft_job):
    import re

    block = re.search(r"<!-- rft-client -->\s*```python\n(.+?)\n```", (REPO / "README.md").read_text(), re.S).group(1)
    env = {**_env(server.workdir), "OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": ALICE}
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    reward, done, header = out.stdout.splitlines()[:3]
    assert reward == "reward 1.0"
    status, model = done.split()
    assert status == "succeeded" and model.startswith("ft:smollm2-135m-instruct:tuneforge:sentiment-rft:")
    assert header.startswith("step,train_loss,train_reward_mean")


def test_streamed_chunks_are_openai_shaped(server):
    with httpx.stream(
        "POST",
        f"{server.url}/chat/completions",
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=120,
        json={
            "model": "base",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 6,
            "messages": [{"role": "user", "content": "Say hello"}],
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [checked(ChatCompletionChunk, json.loads(line[6:])) for line in lines[:-1]]
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_one_connection_carries_several_requests(server):
    import socket

    request = (f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        replies = []
        for _ in range(3):  # keep-alive: the same socket, one request after another
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += sock.recv(65536)
            replies.append((head.split(b"\r\n")[0], json.loads(body)))
    assert [status for status, _ in replies] == [b"HTTP/1.1 200 OK"] * 3
    assert all(body["object"] == "list" for _, body in replies)


def test_another_key_sees_nothing_of_alices_and_no_key_gets_401(server, paused_job):
    model = paused_job["fine_tuned_model"]
    assert model not in [m.id for m in server.bob.models.list()]
    with pytest.raises(openai.NotFoundError):
        server.bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        server.bob.fine_tuning.jobs.retrieve(paused_job["id"])
    with pytest.raises(openai.NotFoundError):
        server.bob.files.content(paused_job["training_file"])
    assert server.bob.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.url, api_key="sk-wrong-0000000000000000", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert httpx.get(f"{server.url}/models").status_code == 401
    log = (server.workdir / "process.log").read_text()
    assert ALICE not in log and BOB not in log


def test_the_readmes_migration_client_code_runs_unchanged(server):
    import re

    block = re.search(
        r"<!-- migration-client -->\s*```python\n(.+?)\n```", (REPO / "README.md").read_text(), re.S
    ).group(1)
    env = {**_env(server.workdir), "OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": ALICE}
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    status, model, tokens = out.stdout.splitlines()[0].split()
    assert status == "succeeded" and model.startswith("ft:smollm2-135m-instruct:tuneforge:reviews:") and int(tokens) > 0
    assert "The job has successfully completed" in out.stdout
    job = next(j for j in server.alice.fine_tuning.jobs.list() if j.fine_tuned_model == model)
    assert job.model == "gpt-4o-mini-2024-07-18" and job.seed == 42 and job.hyperparameters.n_epochs == 5
    assert any(
        "this server fine-tunes builtin:smollm2-135m-instruct in its place" in e.message
        for e in server.alice.fine_tuning.jobs.list_events(job.id, limit=50)
    )


def test_a_burst_of_chats_and_uploads_gets_answers_or_openai_shaped_429s(server):
    from concurrent.futures import ThreadPoolExecutor

    line = CONVERSATIONS.read_text().splitlines()[0] + "\n"

    from concurrent.futures import wait

    from tuneforge.serve.server import MAX_WAITING

    def chat(n: int):
        try:
            reply = server.alice.chat.completions.create(
                model="base", max_tokens=4, messages=[{"role": "user", "content": f"Count to {n}"}]
            )
            return 200, reply.choices[0].message.content is not None
        except openai.APIStatusError as exc:  # the documented overload answer: OpenAI's rate-limit error
            body = exc.body if isinstance(exc.body, dict) else {}
            shaped = (body.get("code"), body.get("type")) == ("rate_limit_exceeded", "rate_limit_error")
            return exc.status_code, shaped and bool(body.get("message"))

    def upload(n: int):
        try:
            stored = server.alice.files.create(file=(f"part-{n}.jsonl", (line * 20).encode()), purpose="fine-tune")
            return 200, stored.bytes == len(line) * 20
        except openai.APIStatusError as exc:
            return exc.status_code, exc.body

    with ThreadPoolExecutor(84) as pool:
        chats = [pool.submit(chat, n) for n in range(64)]
        uploads = [pool.submit(upload, n) for n in range(20)]
        _, hanging = wait(chats + uploads, timeout=600)
        # every request is answered, none hangs
        assert not hanging, f"{len(hanging)} requests had no answer after 600 s"
        results = [f.result() for f in chats + uploads]
    # each chat is answered or refused with the OpenAI-shaped 429 for a full queue; nothing else (no 500, no 503)
    assert all(status in (200, 429) and ok is True for status, ok in results[:64]), results[:64]
    assert [r for r in results[64:]] == [(200, True)] * 20  # uploads are not queued behind the model
    answered = sum(status == 200 for status, _ in results[:64])
    # a 429 comes only when MAX_WAITING chats are already waiting, and each of those is answered: however the burst
    # arrives, any refusal means at least MAX_WAITING answers, and no refusal means all 64
    assert answered == 64 or answered >= MAX_WAITING, answered
    reply = server.alice.chat.completions.create(
        model="base", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices


def test_import_openai_writes_an_experiment_whose_eval_compares_with_the_hosted_model(server, paused_job, tmp_path):
    from tuneforge.config import load_experiment

    env = {**_env(server.workdir), "OPENAI_API_KEY": ALICE, "OPENAI_BASE_URL": server.url}
    out = tmp_path / "imported"

    def tuneforge(*args):
        return subprocess.run(
            [sys.executable, "-m", "tuneforge", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=900,
        )

    imported = tuneforge("import-openai", paused_job["id"], "--out", str(out))
    assert imported.returncode == 0, imported.stderr
    folder = out / "support"  # named after the job's suffix
    assert (folder / "train.jsonl").read_bytes() == server.alice.files.content(paused_job["training_file"]).read()
    assert (folder / "valid.jsonl").read_bytes() == server.alice.files.content(paused_job["validation_file"]).read()
    experiment = load_experiment(folder / "experiment.yaml")
    assert (
        experiment.seed == 7
        and experiment.train.method == "sft"
        and experiment.train.epochs == 1
        and experiment.train.batch_size == 4
    )
    assert experiment.eval.systems == ["base", "finetuned", f"openai:{paused_job['fine_tuned_model']}"]
    assert all(ALICE not in p.read_text() for p in folder.iterdir())
    # not over an earlier import without --force
    assert tuneforge("import-openai", paused_job["id"], "--out", str(out)).returncode == 1
    missing = tuneforge("import-openai", "ftjob-nope", "--out", str(out))
    assert missing.returncode == 1 and "404" in missing.stderr

    parity = tuneforge(
        "run",
        str(folder / "experiment.yaml"),
        "--run-dir",
        str(tmp_path / "parity"),
        "model.quantization=none",
        "data.max_length=128",
        "train.max_steps=2",
        "eval.max_new_tokens=8",
        "eval.sample=3",
    )
    assert parity.returncode == 0, parity.stderr[-3000:]
    metrics = json.loads((tmp_path / "parity" / "eval" / "metrics.json").read_text())
    hosted = f"openai:{paused_job['fine_tuned_model']}"
    assert set(metrics) == {"base", "finetuned", hosted} and metrics[hosted]["examples"] == 3


def test_sigkill_mid_job_then_restart_continues_the_job_and_keeps_the_files(server, files):
    training, _ = files
    content = server.raw("GET", f"/files/{training}/content").content
    job = server.raw(
        "POST",
        "/fine_tuning/jobs",
        json={
            "model": "base",
            "training_file": training,
            "seed": 3,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        },
    ).json()
    deadline = time.time() + 300
    while not server.raw("GET", f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]:
        status = server.raw("GET", f"/fine_tuning/jobs/{job['id']}").json()["status"]
        assert time.time() < deadline and status in ("validating_files", "queued", "running")
        time.sleep(0.1)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    with server.start() as proc:  # the same run folder, the same port
        server.proc = proc
        finished = _wait(server, job["id"], ("succeeded",))
        events = _events(server, job["id"])
        assert any(
            m.startswith(
                "The server stopped while this job was training; it is queued again and continues from its checkpoint"
            )
            for m in events
        )
        assert any(m.startswith("Fine-tuning job resumed from its checkpoint at step") for m in events)
        assert finished["fine_tuned_model"] in [m.id for m in server.alice.models.list()]
        assert server.raw("GET", f"/files/{training}/content").content == content
        listed = [f.id for f in server.alice.files.list()]
        assert training in listed and all(checked(FileObject, f.model_dump()) for f in server.alice.files.list())
        assert not list((server.workdir / "server" / "api" / "files").glob(".*.tmp"))  # no half-written upload left
