"""The fine-tuning platform in-process: the real FastAPI app over the real SQLite store, driven through Starlette's
test client (no model is loaded: these jobs fail validation, or wait with the worker off). Every body is checked
against the openai package's own types. Training jobs end to end: tests/e2e/test_platform.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from openai.types import FileDeleted, FileObject, Model
from openai.types.fine_tuning import FineTuningJobEvent

from tests.wire import checked, checked_job, checked_page
from tuneforge.config import Experiment
from tuneforge.errors import TuneforgeError
from tuneforge.run import RunDir
from tuneforge.serve.finetuning import Platform
from tuneforge.serve.keys import ApiKeys, bearer, check_binding, load_keys
from tuneforge.serve.server import Served, create_app
from tuneforge.serve.store import Store
from tuneforge.serve.wire import step_metrics_csv, upload_name

ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-fedcba9876543210"
LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
LINE_ANSWER = {"role": "assistant", "content": "Paris is the capital of France."}


def _app(tmp_path: Path, keys: ApiKeys | None = None, max_upload: int = 64 << 10, **platform):
    experiment = Experiment.model_validate({"name": "server"})
    run = RunDir(experiment, tmp_path / "server")
    served = Served(experiment, run)
    api = Platform(experiment, run, served, keys, worker=False, **platform)
    app = create_app(served, keys, [api.router()], max_upload=max_upload)
    return TestClient(app, base_url="http://localhost"), api  # the server answers its loopback names only


def _keys() -> ApiKeys:
    return load_keys(environ={"TUNEFORGE_API_KEYS": f"alice:{ALICE}, bob:{BOB}"})


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _upload(client, text: str, name: str = "train.jsonl", headers: dict | None = None):
    return client.post(
        "/v1/files", headers=headers or {}, data={"purpose": "fine-tune"}, files={"file": (name, text.encode())}
    )


def _wait_status(client, job_id: str, status: str, headers: dict | None = None) -> dict:
    import time

    deadline = time.time() + 20
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers or {}).json())["status"] != status:
        assert time.time() < deadline, job
        time.sleep(0.05)
    return job


def test_files_and_jobs_survive_a_restart_and_every_body_is_openai_shaped(tmp_path):
    client, _ = _app(tmp_path)
    uploaded = _upload(client, f"{LINE}\n" * 3, "few.jsonl")
    assert uploaded.status_code == 200
    file = checked(FileObject, uploaded.json())
    assert (
        file.bytes == len(LINE) * 3 + 3
        and "expires_at" not in uploaded.json()
        and "status_details" not in uploaded.json()
    )
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "base", "training_file": file.id, "suffix": "x", "metadata": {"team": "a"}},
    )
    checked_job(job.json())
    failed = checked_job(_wait_status(client, job.json()["id"], "failed"))  # 3 examples < 10
    assert failed.error.code == "invalid_n_examples" and failed.error.param == "training_file" and failed.finished_at
    missing = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": "file-nope"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"

    again, _ = _app(tmp_path)  # a new server over the same run folder: the state is in the database
    assert checked(FileObject, again.get(f"/v1/files/{file.id}").json()).filename == "few.jsonl"
    listed = checked_page(type(failed), again.get("/v1/fine_tuning/jobs?limit=5").json())
    assert [j.id for j in listed] == [failed.id] and listed[0].error.code == "invalid_n_examples"
    events = checked_page(FineTuningJobEvent, again.get(f"/v1/fine_tuning/jobs/{failed.id}/events").json())
    assert events[0].level == "error" and events[-1].message.startswith("Created fine-tuning job")  # newest first
    assert again.post(f"/v1/fine_tuning/jobs/{failed.id}/cancel").status_code == 400  # a failed job cannot be cancelled
    assert again.get(f"/v1/files/{file.id}/content").content == f"{LINE}\n".encode() * 3
    assert [m.id for m in checked_page(Model, again.get("/v1/models").json())] == ["base"]
    deleted = checked(FileDeleted, again.delete(f"/v1/files/{file.id}").json())
    assert deleted.deleted and deleted.id == file.id
    assert again.get(f"/v1/files/{file.id}/content").status_code == 404
    assert list((tmp_path / "server" / "api" / "files").iterdir()) == []


def test_keys_are_required_and_each_project_sees_only_its_own(tmp_path):
    client, _ = _app(tmp_path, _keys())
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong = client.get("/v1/models", headers=_as(ALICE[:-1] + "X"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert ALICE[:-1] not in wrong.text
    file = _upload(client, f"{LINE}\n" * 12, headers=_as(ALICE)).json()
    job = client.post(
        "/v1/fine_tuning/jobs", headers=_as(ALICE), json={"model": "base", "training_file": file["id"]}
    ).json()
    assert client.get(f"/v1/files/{file['id']}", headers=_as(ALICE)).status_code == 200

    for method, path in [
        ("GET", f"/v1/files/{file['id']}"),
        ("GET", f"/v1/files/{file['id']}/content"),
        ("DELETE", f"/v1/files/{file['id']}"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/pause"),
    ]:
        assert client.request(method, path, headers=_as(BOB)).status_code == 404, (method, path)
    assert client.get("/v1/files", headers=_as(BOB)).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=_as(BOB)).json()["data"] == []
    stolen = client.post("/v1/fine_tuning/jobs", headers=_as(BOB), json={"model": "base", "training_file": file["id"]})
    assert stolen.status_code == 400 and stolen.json()["error"]["code"] == "invalid_file_id"
    assert _wait_status(client, job["id"], "queued", _as(ALICE))["status"] == "queued"  # untouched by bob
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=_as(ALICE)).json()["status"] == "cancelled"


def test_upload_names_cannot_escape_the_store_and_bodies_have_limits(tmp_path):
    client, _ = _app(tmp_path, max_upload=4096)
    outside = tmp_path / "server" / "escaped.jsonl"
    sneaky = _upload(client, f"{LINE}\n", "../../escaped.jsonl").json()
    assert sneaky["filename"] == "escaped.jsonl" and not outside.exists()
    assert sorted(p.name for p in (tmp_path / "server" / "api" / "files").iterdir()) == [f"{sneaky['id']}.jsonl"]
    assert (
        upload_name("..\\..\\x.jsonl") == "x.jsonl"
        and upload_name("") == "upload.jsonl"
        and upload_name("a\x00b.jsonl") == "ab.jsonl"
    )

    big = _upload(client, f"{LINE}\n" * 200)  # over the 4 KiB upload limit
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert (
        len(client.get("/v1/files").json()["data"]) == 1
        and len(list((tmp_path / "server" / "api" / "files").iterdir())) == 1
    )
    huge = client.post(
        "/v1/chat/completions", content=b"{" + b" " * (5 << 20) + b"}", headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413

    def chunks(data: bytes):  # no Content-Length: the limit must hold on what arrives
        yield from (data[i : i + 8192] for i in range(0, len(data), 8192))

    streamed = client.post(
        "/v1/chat/completions",
        content=chunks(b"{" + b" " * (5 << 20) + b"}"),
        headers={"Content-Type": "application/json"},
    )
    assert streamed.status_code == 413 and "content-length" not in {k.lower() for k in streamed.request.headers}
    small = client.post(
        "/v1/chat/completions",
        content=chunks(json.dumps({"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}).encode()),
        headers={"Content-Type": "application/json"},
    )
    assert small.status_code == 404  # read whole and answered as usual
    request = httpx.Request(
        "POST",
        "http://x/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("big.jsonl", f"{LINE}\n".encode() * 200)},
    )
    streamed_upload = client.post(
        "/v1/files", content=chunks(request.read()), headers={"Content-Type": request.headers["content-type"]}
    )
    assert streamed_upload.status_code == 413
    assert len(list((tmp_path / "server" / "api" / "files").iterdir())) == 1  # nothing of it was stored
    not_multipart = client.post("/v1/files", json={"purpose": "fine-tune"})
    assert not_multipart.status_code == 400
    wrong_purpose = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("t.jsonl", b"{}")})
    assert wrong_purpose.status_code == 400 and wrong_purpose.json()["error"]["param"] == "purpose"


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "reinforcement"}}, "method"),  # its grader is required
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "string_check"}}}},
            "method.reinforcement.grader",
        ),
        ({"method": {"type": "grpo"}}, "method.type"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        ({"suffix": "a:b"}, "suffix"),
        ({"seed": "7"}, "seed"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, None),
        ({"integrations": [{"type": "wandb", "wandb": {}}]}, "integrations.0.wandb.project"),
        ({"learning_rate": 3}, "learning_rate"),
        ({"model": None}, "model"),
    ],
)
def test_job_requests_are_validated_naming_the_parameter(tmp_path, body, param):
    client, _ = _app(tmp_path)
    file = _upload(client, f"{LINE}\n" * 12).json()
    response = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"], **body})
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_methods_are_echoed_and_limits_and_state_rules_hold(tmp_path):
    client, _ = _app(tmp_path, max_unfinished=2)
    file = _upload(client, f"{LINE}\n" * 12).json()
    dpo = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "base",
            "training_file": file["id"],
            "metadata": {"team": "red"},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}},
        },
    )
    job = checked_job(dpo.json())
    assert (
        job.method.type == "dpo"
        and job.method.dpo.hyperparameters.beta == 0.25
        and job.method.dpo.hyperparameters.n_epochs == 2
    )
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    # chat lines are not preference pairs: the dpo job fails validation, naming the line
    failed = checked_job(_wait_status(client, job.id, "failed"))
    assert "train.jsonl line 1" in failed.error.message and "preference" in failed.error.message
    sft = [
        client.post(
            "/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"], "metadata": {"team": t}}
        ).json()
        for t in ("green", "blue")
    ]
    assert all(_wait_status(client, j["id"], "queued")["status"] == "queued" for j in sft)
    over = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"]})
    assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "red"}).json()["data"]] == [
        job.id
    ]
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "blue"}).json()["data"]] == [
        sft[1]["id"]
    ]
    queued = sft[0]["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{queued}/pause").status_code == 400  # only a running job pauses
    assert client.post(f"/v1/fine_tuning/jobs/{queued}/resume").status_code == 400  # only a paused one resumes
    in_use = client.delete(f"/v1/files/{file['id']}")
    assert in_use.status_code == 400 and in_use.json()["error"]["code"] == "file_in_use"
    assert checked_job(client.post(f"/v1/fine_tuning/jobs/{queued}/cancel").json()).status == "cancelled"
    assert (
        client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"]}).status_code == 200
    )  # room again
    unknown_model = client.post(
        "/v1/fine_tuning/jobs", json={"model": "ft:someone-else:x", "training_file": file["id"]}
    )
    assert unknown_model.status_code == 400 and unknown_model.json()["error"]["param"] == "model"


def test_errors_are_openai_shaped_on_unknown_paths_methods_and_bodies(tmp_path):
    client, _ = _app(tmp_path)
    for response, status in [
        (client.get("/v1/nope"), 404),
        (client.delete("/v1/models"), 405),
        (client.post("/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}), 400),
        (client.post("/v1/chat/completions", json={"model": "base", "messages": [], "temperature": 1}), 400),
        (
            client.post(
                "/v1/chat/completions",
                json={"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            ),
            400,
        ),
        (
            client.post(
                "/v1/chat/completions", json={"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}
            ),
            404,
        ),
    ]:
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (
        client.post(
            "/v1/chat/completions",
            json={"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
        ).json()["error"]["param"]
        == "temperature"
    )


def test_a_job_whose_server_died_mid_training_is_queued_again(tmp_path):
    client, api = _app(tmp_path)
    file = _upload(client, f"{LINE}\n" * 12).json()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"]}).json()
    _wait_status(client, job["id"], "queued")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert (
        api.store.claim_job(f"{os.uname().nodename}:{dead.pid}") == job["id"]
    )  # claimed by a process that is gone now
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "running"
    again, _ = _app(tmp_path)
    assert again.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
    messages = [e["message"] for e in again.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert "starts again from the beginning" in messages[0]


def test_only_one_of_many_claimants_gets_a_queued_job(tmp_path):
    path = tmp_path / "platform.sqlite3"
    store = Store(path)
    store.add_job({"id": "ftjob-1", "created_at": 1, "status": "queued"}, "default", {})
    won, barrier = [], threading.Barrier(8)

    def claim(n: int):
        mine = Store(path)  # its own connection, as another process would have
        barrier.wait()
        if mine.claim_job(f"worker-{n}") is not None:
            won.append(n)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert store.job_row("ftjob-1")["worker"] == f"worker-{won[0]}"
    assert store.update_job("ftjob-1", {"status": "succeeded"}, unless=("running",)) is None  # the guard holds it back
    assert store.update_job("ftjob-1", {"status": "queued"}, only=("paused",)) is None  # so does `only`
    assert store.update_job("ftjob-1", {"estimated_finish": 9}, only=("running",))["estimated_finish"] == 9


def test_the_json_file_state_of_the_previous_version_is_imported(tmp_path):
    root = tmp_path / "api"
    (root / "files").mkdir(parents=True)
    (root / "files" / "file-1.json").write_text(
        json.dumps(
            {
                "id": "file-1",
                "object": "file",
                "bytes": 3,
                "created_at": 5,
                "filename": "a.jsonl",
                "purpose": "fine-tune",
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            }
        )
    )
    (root / "jobs" / "ftjob-1").mkdir(parents=True)
    (root / "jobs" / "ftjob-1" / "job.json").write_text(
        json.dumps(
            {
                "job": {"id": "ftjob-1", "created_at": 6, "status": "failed"},
                "events": [{"id": "ftevent-1", "message": "m"}],
                "checkpoints": [],
            }
        )
    )
    store = Store(root / "platform.sqlite3")
    assert checked(FileObject, store.file("file-1", "default")).filename == "a.jsonl"
    assert "expires_at" not in store.file("file-1")
    assert store.job("ftjob-1", "default")["status"] == "failed" and store.events("ftjob-1")[0]["message"] == "m"
    assert not (root / "jobs" / "ftjob-1" / "job.json").exists()


def test_keys_come_from_the_environment_or_a_file_and_are_never_echoed(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nalice:{ALICE}\n\n{BOB}   # the default project\n")
    keys_file.chmod(0o600)
    keys = load_keys(keys_file, environ={})
    assert (
        keys.projects == ["alice", "default"]
        and keys.project_of(ALICE) == "alice"
        and keys.project_of(BOB) == "default"
    )
    assert keys.project_of(ALICE + "x") is None and keys.project_of(None) is None
    both = load_keys(environ={"TUNEFORGE_API_KEYS": f"carol:{ALICE[::-1]}", "TUNEFORGE_API_KEYS_FILE": str(keys_file)})
    assert both.projects == ["alice", "carol", "default"]
    keys_file.write_text("alice:short\n")
    with pytest.raises(TuneforgeError, match=f"{keys_file} line 1: an API key must be at least 16") as info:
        load_keys(keys_file, environ={})
    assert "short" not in str(info.value)
    with pytest.raises(TuneforgeError, match="two projects"):
        load_keys(environ={"TUNEFORGE_API_KEYS": f"a:{ALICE},b:{ALICE}"})
    assert (
        bearer(f"Bearer {ALICE}") == ALICE
        and bearer(f"bearer  {ALICE} ") == ALICE
        and bearer(f"Basic {ALICE}") is None
        and bearer("") is None
    )
    with pytest.raises(TuneforgeError, match="refusing to serve on 0.0.0.0 without API keys"):
        check_binding("0.0.0.0", ApiKeys())
    check_binding("127.0.0.1", ApiKeys())
    check_binding("0.0.0.0", keys)


def test_serve_refuses_to_bind_beyond_loopback_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_API_KEYS")}
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "serve", str(config), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 1 and "refusing to serve on 0.0.0.0 without API keys" in out.stderr


def test_the_result_file_has_openai_s_columns():
    records = [
        {"step": 0, "eval_loss": 3.0},
        {"step": 1, "loss": 2.5, "token_accuracy": 0.4},
        {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 2.2},
    ]
    assert step_metrics_csv(records).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "1,2.5,0.4,,",
        "2,2,,2.2,",
    ]


def test_a_stream_whose_client_leaves_stops_generating(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from tuneforge.engine.generation import Settings
    from tuneforge.serve.chat_wire import Chat
    from tuneforge.serve.server import _events

    experiment = Experiment.model_validate({"name": "server"})
    served = Served(experiment, RunDir(experiment, tmp_path / "server"))
    produced, closed = [], []

    def pieces():
        try:
            for i in range(1000):
                produced.append(i)
                yield f"w{i} "
        finally:
            closed.append(True)  # the batcher's stream ends its row in the batch here

    class Client:
        checks = 0

        async def is_disconnected(self):
            self.checks += 1
            return self.checks > 3  # gone after three pieces

    async def read():
        return [
            chunk
            async for chunk in _events(
                served,
                SimpleNamespace(stream=lambda m, s: pieces()),
                Chat("base", [{"role": "user", "content": "hi"}], Settings(), None),
                Client(),
            )
        ]

    chunks = asyncio.run(read())
    assert closed == [True] and len(produced) <= 5
    assert len(chunks) == 4 and "[DONE]" not in chunks[-1]  # the role chunk and three pieces, then nothing
    assert served.waiting == 0  # its place in the queue was given back


def test_only_the_bound_host_names_are_answered_and_other_sites_cannot_post(tmp_path):
    client, _ = _app(tmp_path)
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1@evil", ""):
        refused = client.get("/v1/models", headers={"Host": host})  # DNS rebinding: the page's own name
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host", host
    # a form another site's page submits: multipart needs no CORS preflight, so only the Origin tells
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        posted = _upload(client, f"{LINE}\n", headers=headers)
        assert posted.status_code == 403 and posted.json()["error"]["code"] == "cross_origin", headers
    assert client.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: CORS
    assert _upload(client, f"{LINE}\n", headers={"Origin": "http://localhost"}).status_code == 200  # its own page
    assert _upload(client, f"{LINE}\n", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.get("/v1/files").json()["data"] and len(client.get("/v1/files").json()["data"]) == 2
    slash = client.post("/v1/chat/completions/", json={}, headers={"Host": "localhost"}, follow_redirects=False)
    assert slash.status_code == 404 and "location" not in slash.headers  # no redirect built from the Host


def test_the_host_names_follow_the_binding_and_the_operator():
    from tuneforge.origins import HostPolicy, host_name

    assert [host_name(h) for h in ("LocalHost:80", "[::1]:1", "[::1", "a:b", "x/y", "ok.example.")] == [
        "localhost",
        "::1",
        None,
        None,
        None,
        "ok.example",
    ]
    loopback = HostPolicy.bound_to("127.0.0.1")
    assert loopback.allows("localhost") and not loopback.allows("10.0.0.2") and not loopback.allows("api.example")
    lan = HostPolicy.bound_to("192.168.1.5", ["api.example"])
    assert lan.allows("192.168.1.5") and lan.allows("api.example") and not lan.allows("10.0.0.2")
    everywhere = HostPolicy.bound_to("0.0.0.0")
    assert everywhere.allows("10.0.0.2") and everywhere.allows("fe80::1") and not everywhere.allows("evil.example")
    assert HostPolicy.bound_to("127.0.0.1", ["*"]).allows("anything.example")
    assert not lan.cross_site({b"origin": b"https://api.example"}, "192.168.1.5:8000")  # the operator's page


def test_a_job_whose_files_cannot_be_checked_fails_saying_why_also_after_a_restart(tmp_path):
    client, api = _app(tmp_path)
    deep = _upload(client, f"{LINE}\n" * 11 + "[" * 5000 + "]" * 5000 + "\n", "deep.jsonl").json()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": deep["id"]}).json()
    failed = checked_job(_wait_status(client, job["id"], "failed"))  # the JSON reader's depth: a RecursionError
    assert failed.error.param == "training_file" and "deep.jsonl" in failed.error.message
    assert "nested too deeply" in failed.error.message

    gone = _upload(client, f"{LINE}\n" * 12, "gone.jsonl").json()
    (tmp_path / "server" / "api" / "files" / f"{gone['id']}.jsonl").unlink()  # the bytes lost from disk
    job = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": gone["id"]}).json()
    failed = checked_job(_wait_status(client, job["id"], "failed"))
    assert "no such file" in failed.error.message and str(tmp_path) not in failed.error.message

    # a server that stopped while validating: the job is checked again at start, and fails rather than waits forever
    stuck = {**job, "id": "ftjob-stuck", "status": "validating_files", "training_file": deep["id"], "error": None}
    api.store.add_job(stuck, "default", {"model_id": "ft:x"})
    again, _ = _app(tmp_path)
    assert _wait_status(again, "ftjob-stuck", "failed")["error"]["code"] == "invalid_file"


@pytest.mark.slow
def test_a_wandb_job_on_a_server_without_a_key_logs_offline_and_says_where(tmp_path, monkeypatch):
    from tuneforge.serve.finetuning import _wandb

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")  # no `wandb login` either
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    client, api = _app(tmp_path)
    file = _upload(client, f"{LINE}\n" * 12).json()
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "base",
            "training_file": file["id"],
            "integrations": [{"type": "wandb", "wandb": {"project": "p"}}],
        },
    ).json()
    with _wandb(api, job["id"], api.store.job(job["id"])):
        import wandb

        run = wandb.init()  # as the trainer's callback starts it: project, run id and mode from the environment
        run.log({"loss": 1.0})
        run.finish()
    logged = list((tmp_path / "server" / "api" / "jobs" / job["id"] / "wandb").glob(f"offline-run-*-{job['id']}"))
    assert logged and "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ  # the server's own, restored
    said = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert any(f"wandb sync api/jobs/{job['id']}/wandb/offline-run-*" in m for m in said)


def test_a_job_whose_every_example_is_too_long_says_how_many_the_longest_and_the_limit(tmp_path, tiny_model_dir):
    experiment = Experiment.model_validate(
        {"name": "server", "model": {"ref": str(tiny_model_dir)}, "data": {"max_length": 16}}
    )
    run = RunDir(experiment, tmp_path / "server")
    served = Served(experiment, run)
    api = Platform(experiment, run, served)  # its worker on: the job starts
    client = TestClient(create_app(served, None, [api.router()]), base_url="http://localhost")
    long = {"messages": [{"role": "user", "content": "The capital of France is Paris. " * 6}, LINE_ANSWER]}
    file = _upload(client, f"{json.dumps(long)}\n" * 12).json()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"]}).json()
    failed = checked_job(_wait_status(client, job["id"], "failed"))
    assert failed.error.param == "training_file"
    assert "limit of 16 tokens (data.max_length)" in failed.error.message
    assert "12 of 12 examples are longer (the longest: " in failed.error.message
    assert (tmp_path / "server" / "api" / "jobs" / job["id"]).stat().st_mode & 0o777 == 0o700  # its folder: private


def test_a_keys_file_entry_that_would_be_read_as_something_else_is_refused_naming_its_line(tmp_path):
    keys_file = tmp_path / "keys"
    for text, why in [
        (f"alice:{ALICE}\nbob:{BOB[:10]}#{BOB[10:]}\n", "line 2: a '#' inside a key"),  # was cut at the '#'
        (f"{ALICE}:{BOB}\n", "line 1: an entry is KEY or PROJECT:KEY"),  # was project ALICE, key BOB
        (f"alice:{ALICE}:{BOB}\n", "line 1: an entry is KEY or PROJECT:KEY"),
    ]:
        keys_file.write_text(text)
        keys_file.chmod(0o600)
        with pytest.raises(TuneforgeError, match=why) as refused:
            load_keys(keys_file, environ={})
        assert ALICE not in str(refused.value) and BOB[:10] not in str(refused.value)  # keys are never printed
    keys_file.write_text(f"alice:{ALICE}  # a comment after a space\n#{BOB}\n")
    assert load_keys(keys_file, environ={}).projects == ["alice"]


def test_uploads_jobs_and_the_database_are_this_users_alone_and_orphans_go_at_start(tmp_path):
    import stat
    import time

    client, _ = _app(tmp_path)
    api = tmp_path / "server" / "api"
    file = _upload(client, f"{LINE}\n" * 12).json()
    client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file["id"]})

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(api) == mode(api / "files") == mode(api / "jobs") == 0o700
    assert mode(api / "files" / f"{file['id']}.jsonl") == 0o600
    assert {p.name: mode(p) for p in api.glob("platform.sqlite3*")} == {
        name: 0o600 for name in ("platform.sqlite3", "platform.sqlite3-wal", "platform.sqlite3-shm")
    }
    orphan = api / "files" / f".{file['id']}x.jsonl.abc123.tmp"  # a SIGKILL while storing an upload leaves it
    orphan.write_bytes(b"half")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    fresh = api / "files" / ".file-other.jsonl.def456.tmp"  # another server over this run folder storing one now
    fresh.write_bytes(b"half")
    _app(tmp_path)  # the server starts again
    assert not orphan.exists() and fresh.exists()
    assert client.get(f"/v1/files/{file['id']}/content").status_code == 200


PYTHON_GRADER = {"type": "python", "name": "one", "source": "def grade(sample, item):\n    return 1.0\n"}


def test_python_graders_run_only_where_the_server_allows_them(tmp_path):
    """A python grader runs the client's code on the server: refused unless `serve --allow-python-graders`, also
    inside a multi grader and as a reinforcement job's reward; allowed, it runs in its sandbox."""
    client, _ = _app(tmp_path / "closed")
    run = {"grader": PYTHON_GRADER, "model_sample": "x", "item": {}}
    nested = {
        "type": "multi",
        "name": "m",
        "graders": {"p": PYTHON_GRADER},
        "calculate_output": "p",
    }
    for path, body in [
        ("/v1/fine_tuning/alpha/graders/run", run),
        ("/v1/fine_tuning/alpha/graders/validate", {"grader": PYTHON_GRADER}),
        ("/v1/fine_tuning/alpha/graders/run", {**run, "grader": nested}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 400, response.json()
        error = response.json()["error"]
        assert error["code"] == "python_grader_not_allowed" and "--allow-python-graders" in error["message"]
    file = _upload(client, f"{LINE}\n" * 12).json()
    job = {
        "model": "base",
        "training_file": file["id"],
        "method": {"type": "reinforcement", "reinforcement": {"grader": PYTHON_GRADER}},
    }
    refused = client.post("/v1/fine_tuning/jobs", json=job)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "method.reinforcement.grader"
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created

    allowed, _ = _app(tmp_path / "open", python_graders=True)
    result = allowed.post("/v1/fine_tuning/alpha/graders/run", json=run)
    assert result.status_code == 200 and result.json()["reward"] == 1.0
