"""The pieces of the openai backend and of serve's fine-tuning API that need no server."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from tuneforge.config import Experiment, LocalTrain, load_experiment
from tuneforge.errors import TuneforgeError
from tuneforge.serve.wire import JobFailed, local_train_section, page, read_examples, short_model_name
from tuneforge.train import openai_backend as backend

DATA = {"train.jsonl": "a" * 64, "valid.jsonl": "b" * 64}
ESTIMATE = {
    "model": "gpt-4o-mini-2024-07-18",
    "n_epochs": 3,
    "n_epochs_source": "auto (OpenAI's rule)",
    "billed_tokens": 123_000,
    "price_per_1m_tokens": 3.0,
    "estimated_cost_usd": 0.369,
    "note": "tokens counted locally",
}


def _experiment(**train) -> Experiment:
    return Experiment.model_validate({"name": "hosted", "train": {"backend": "openai", **train}})


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- re-attach keying


def test_the_same_config_and_data_give_the_same_key():
    assert backend.job_key(_experiment(), DATA) == backend.job_key(_experiment(), dict(DATA))


@pytest.mark.parametrize(
    "change", [{"epochs": 2}, {"model": "gpt-4.1-mini"}, {"suffix": "v2"}, {"base_url": "http://127.0.0.1:9/v1"}]
)
def test_a_changed_train_section_gives_a_new_key(change):
    assert backend.job_key(_experiment(**change), DATA) != backend.job_key(_experiment(), DATA)


def test_changed_data_or_seed_gives_a_new_key_but_watching_settings_do_not():
    key = backend.job_key(_experiment(), DATA)
    assert backend.job_key(_experiment(), {**DATA, "train.jsonl": "c" * 64}) != key
    seeded = Experiment.model_validate({"name": "hosted", "seed": 7, "train": {"backend": "openai"}})
    assert backend.job_key(seeded, DATA) != key
    assert backend.job_key(_experiment(poll_seconds=1, price_per_1m_tokens=25), DATA) == key


# --------------------------------------------------------------------------- the job request


def test_job_request_maps_the_train_section():
    experiment = _experiment(
        epochs=3,
        batch_size="auto",
        lr_multiplier=0.5,
        suffix="support",
        wandb_project="ft",
        metadata={"team": "support"},
    )
    request = backend.job_request(experiment, "k" * 24, "file-train", "file-valid")
    assert request["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}},
    }
    assert request["model"] == "gpt-4o-mini-2024-07-18" and request["seed"] == 42 and request["suffix"] == "support"
    assert request["integrations"] == [{"type": "wandb", "wandb": {"project": "ft"}}]
    assert request["metadata"] == {"team": "support", "tuneforge_experiment": "hosted", "tuneforge_key": "k" * 24}
    assert request["training_file"] == "file-train" and request["validation_file"] == "file-valid"


def test_job_request_leaves_out_what_is_unset():
    request = backend.job_request(_experiment(), "key", "file-train", None)
    assert not {"validation_file", "suffix", "integrations"} & set(request)
    assert request["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }


# --------------------------------------------------------------------------- confirmation


def test_no_terminal_and_no_yes_is_refused_with_exit_code_2(capsys):
    with pytest.raises(backend.NeedsConfirmation, match="--yes") as info:
        backend.confirm(ESTIMATE, yes=False, stdin=io.StringIO("y\n"))
    assert info.value.exit_code == 2
    assert "123,000 billed tokens, about $0.37" in capsys.readouterr().out


def test_yes_accepts_and_a_terminal_is_asked(capsys):
    backend.confirm(ESTIMATE, yes=True, stdin=io.StringIO())
    backend.confirm(ESTIMATE, yes=False, stdin=Terminal("y\n"))
    with pytest.raises(TuneforgeError, match="not confirmed"):
        backend.confirm(ESTIMATE, yes=False, stdin=Terminal("\n"))  # N is the default
    assert "[y/N]" in capsys.readouterr().out


# --------------------------------------------------------------------------- the API key


def test_a_missing_key_is_refused_for_openai_but_not_for_a_local_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(TuneforgeError, match="OPENAI_API_KEY is not set"):
        backend.make_client(_experiment())
    client = backend.make_client(_experiment(base_url="http://127.0.0.1:8000/v1"))
    assert str(client.base_url).startswith("http://127.0.0.1:8000/v1")


def test_the_key_is_never_serialised(monkeypatch, tmp_path):
    key = "sk-test-never-written-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    experiment = _experiment(base_url="http://127.0.0.1:8000/v1")
    client = backend.make_client(experiment)
    assert client.api_key == key  # it is used ...

    class Run:
        def sub(self, *parts):
            return tmp_path.joinpath(*parts)

    state = {"key": backend.job_key(experiment, DATA), "base_url": str(client.base_url), "job_id": "ftjob-1"}
    backend.write_state(Run(), state)
    written = (tmp_path / backend.STATE).read_text() + experiment.to_yaml()
    written += json.dumps(backend.job_request(experiment, state["key"], "file-1", None))
    assert key not in written  # ... and written nowhere


def test_cancel_without_a_recorded_job_says_so(tmp_path):
    class Run:
        def sub(self, *parts):
            return tmp_path.joinpath(*parts)

    with pytest.raises(TuneforgeError, match="nothing to cancel"):
        backend.cancel_job(client=None, run=Run())


def test_an_openai_experiment_file_validates(tmp_path):
    path = tmp_path / "hosted.yaml"
    path.write_text("name: hosted\ntrain: {backend: openai, epochs: 2, poll_seconds: 2.5}\n")
    assert load_experiment(path).train.poll_seconds == 2.5
    path.write_text("name: hosted\ntrain: {backend: openai, poll_seconds: 0}\n")
    with pytest.raises(TuneforgeError, match="poll_seconds"):
        load_experiment(path)


# --------------------------------------------------------------------------- the server side


def test_hyperparameters_map_onto_the_local_trainer():
    train = LocalTrain(epochs=3, batch_size=4, lr=2e-4, max_steps=5)
    auto = local_train_section(
        train, {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, True
    )
    assert (auto["epochs"], auto["batch_size"], auto["lr"], auto["max_steps"]) == (3, 4, 2e-4, 5)
    assert auto["extra_args"] == {}
    given = local_train_section(train, {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 0.5}, False)
    assert (given["epochs"], given["batch_size"], given["lr"], given["lr_multiplier"]) == (1, 2, 2e-4, 0.5)
    from tuneforge.data.plan import plan_training

    def planned_lr(section, answer_tokens):  # the rate training runs at, for 100 examples of that answer length
        return plan_training(LocalTrain.model_validate(section), [40] * 100, [answer_tokens] * 100, False, 256, 0).lr

    assert planned_lr(given, 2) == pytest.approx(1e-4)
    # the job's multiplier applies to the auto rate the plan picks for the data when the server leaves lr on auto
    auto_rate = local_train_section(LocalTrain(), {"learning_rate_multiplier": 0.5}, True)
    assert planned_lr(auto_rate, 2) == pytest.approx(5e-4) and planned_lr(auto_rate, 200) == pytest.approx(1e-4)
    assert given["extra_args"] == {"eval_strategy": "no"}  # nothing to evaluate on without a validation file
    assert LocalTrain.model_validate(given).backend == "local"


def test_a_reinforcement_job_maps_onto_grpo_with_its_grader():
    from tuneforge.config import LocalTrain
    from tuneforge.serve.wire import JobRequest

    grader = {
        "type": "string_check",
        "name": "g",
        "input": "{{sample.output_text}}",
        "reference": "a",
        "operation": "eq",
    }
    request = JobRequest.model_validate(
        {
            "model": "o4-mini",
            "training_file": "file-1",
            "method": {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": grader,
                    "hyperparameters": {"compute_multiplier": 1.5, "eval_interval": 3, "eval_samples": 2},
                },
            },
        }
    )
    method = request.resolved_method()
    assert method["reinforcement"]["grader"] == grader
    assert method["reinforcement"]["hyperparameters"]["n_epochs"] == "auto"
    train = LocalTrain(method="sft")
    section = local_train_section(train, method["reinforcement"]["hyperparameters"], True, "reinforcement", grader)
    parsed = LocalTrain.model_validate(section)
    assert (parsed.method, parsed.grpo.grader, parsed.eval_every) == ("grpo", grader, 3)
    assert (parsed.grpo.generations, parsed.grpo.eval_generations) == (6, 2)  # 4 (the server's) x 1.5
    small = local_train_section(train, {"compute_multiplier": 0.1}, True, "reinforcement", grader)
    assert small["grpo"]["generations"] == 2  # a group needs two completions to compare

    for bad, named in [
        ({"grader": {**grader, "operation": "equals"}}, "operation"),
        ({"grader": grader, "hyperparameters": {"reasoning_effort": "high"}}, "reasoning_effort"),
        ({"grader": grader, "hyperparameters": {"eval_samples": 0}}, "eval_samples"),
    ]:
        with pytest.raises(ValueError, match=named):
            JobRequest.model_validate(
                {"model": "x", "training_file": "f", "method": {"type": "reinforcement", "reinforcement": bad}}
            )
    with pytest.raises(ValueError, match="grader is required"):
        JobRequest.model_validate({"model": "x", "training_file": "f", "method": {"type": "reinforcement"}})


def test_a_reinforcement_file_keeps_every_field_and_needs_a_users_turn_last(tmp_path):
    stored = tmp_path / "file-1.jsonl"
    prompt = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}], "k": [1]}
    stored.write_text(json.dumps(prompt) + "\n")
    (record,) = read_examples(stored, "rft.jsonl", "training_file", "reinforcement")
    assert record == {"messages": [{"role": "system", "content": "Be brief."}, prompt["messages"][1]], "k": [1]}
    stored.write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    with pytest.raises(JobFailed, match="rft.jsonl line 1: \\[prompt_must_end_with_user\\]"):
        read_examples(stored, "rft.jsonl", "training_file", "reinforcement")


def test_an_invalid_line_fails_with_its_number(tmp_path):
    def upload(text: str):  # stored under the server's own name; places are named after the uploaded file
        stored = tmp_path / "file-1.jsonl"
        stored.write_text(text)
        return stored

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert len(read_examples(upload(f"{good}\n\n{good}\n"), "t.jsonl", "training_file")) == 2
    with pytest.raises(JobFailed) as info:
        read_examples(upload(f"{good}\n{{not json\n"), "t.jsonl", "training_file")
    assert info.value.code == "invalid_file_format" and info.value.param == "training_file"
    assert "t.jsonl line 2" in info.value.message
    with pytest.raises(JobFailed, match="line 1: \\[unrecognized_role\\]"):
        read_examples(
            upload(json.dumps({"messages": [{"role": "wizard", "content": "x"}]})), "t.jsonl", "training_file"
        )


def test_pages_follow_the_after_cursor():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = page(items, {"limit": "2"}, 20)
    assert [i["id"] for i in first["data"]] == ["x0", "x1"] and first["has_more"]
    last = page(items, {"limit": "2", "after": "x3"}, 20)
    assert [i["id"] for i in last["data"]] == ["x4"] and not last["has_more"]


def test_short_model_names():
    assert short_model_name("builtin:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert short_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"


def test_prepared_files_are_checked_line_by_line_before_upload(tmp_path):
    from tuneforge.run import RunDir

    run = RunDir(_experiment(), tmp_path / "run")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    run.sub("data").mkdir(parents=True)
    run.sub("data", "train.jsonl").write_text(
        json.dumps(good) + "\n{not json\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    run.sub("data", "valid.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(TuneforgeError) as info:
        backend.check_prepared(run)
    message = str(info.value)
    assert message.startswith("2 problems") and "nothing was uploaded" in message
    assert (
        "train.jsonl line 2" in message
        and "train.jsonl line 3" in message
        and "valid.jsonl" not in message.split("\n", 1)[1]
    )
    run.sub("data", "train.jsonl").write_text(json.dumps(good) + "\n")
    backend.check_prepared(run)  # clean files pass


# --------------------------------------------------------------------------- watching through network trouble


def _flaky_api(failures: int):
    """An OpenAI-shaped transport whose job endpoint answers 503 `failures` times, then reports a finished job."""
    calls = {"job": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/ftjob-1"):
            calls["job"] += 1
            if calls["job"] <= failures:
                return httpx.Response(503, json={"error": {"message": "overloaded", "type": "server_error"}})
            return httpx.Response(
                200,
                json={
                    "id": "ftjob-1",
                    "object": "fine_tuning.job",
                    "status": "succeeded",
                    "model": "m",
                    "fine_tuned_model": "ft:m:x",
                    "created_at": 1,
                    "finished_at": 2,
                    "trained_tokens": 9,
                },
            )
        if path.endswith("/events"):
            event = {
                "id": "ev-1",
                "object": "fine_tuning.job.event",
                "created_at": 1,
                "level": "info",
                "type": "metrics",
                "message": "Step 1/1: train loss=1.5",
                "data": {"step": 1, "train_loss": 1.5},
            }
            return httpx.Response(200, json={"object": "list", "data": [event], "has_more": False})
        if path.endswith("/checkpoints"):
            return httpx.Response(200, json={"object": "list", "data": [], "has_more": False})
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    import openai

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://api.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handle)),
    )
    return client, calls


def test_watching_backs_off_through_server_errors_and_then_finishes(tmp_path, monkeypatch, capsys):
    from tuneforge.run import RunDir

    experiment = _experiment(poll_seconds=1)
    run = RunDir(experiment, tmp_path / "run")
    slept = []
    monkeypatch.setattr(backend.time, "sleep", slept.append)
    client, calls = _flaky_api(failures=3)
    assert backend.watch(client, experiment, run, {"job_id": "ftjob-1"}) == 0
    assert calls["job"] == 4 and slept == [2, 4, 8]  # doubling from the poll interval, no poll after the finish
    assert capsys.readouterr().err.count("retrying in") == 3
    assert json.loads(run.sub("metrics.jsonl").read_text()) == {"step": 1, "loss": 1.5}
    assert json.loads(run.sub(backend.STATE).read_text())["fine_tuned_model"] == "ft:m:x"


def test_watching_gives_up_after_too_many_failures_and_says_how_to_reattach(tmp_path, monkeypatch):
    from tuneforge.run import RunDir

    experiment = _experiment(poll_seconds=1)
    monkeypatch.setattr(backend.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(backend, "MAX_NETWORK_FAILURES", 4)
    client, calls = _flaky_api(failures=100)
    with pytest.raises(TuneforgeError, match="run the same `tuneforge train` again to re-attach"):
        backend.watch(client, experiment, RunDir(experiment, tmp_path / "run"), {"job_id": "ftjob-1"})
    assert calls["job"] == 5


def test_a_dpo_experiment_sends_openai_s_dpo_method_with_its_beta():
    request = backend.job_request(_experiment(method="dpo", dpo={"beta": 0.25}, epochs=2), "key", "file-train", None)
    assert request["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto", "beta": 0.25}
        },
    }


def test_prepared_preference_pairs_pass_the_upload_check_and_broken_ones_are_named(tmp_path):
    from tuneforge.run import RunDir

    run = RunDir(_experiment(method="dpo"), tmp_path / "run")
    pair = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}],
    }
    run.sub("data").mkdir(parents=True)
    run.sub("data", "train.jsonl").write_text(json.dumps(pair) + "\n")
    run.sub("data", "valid.jsonl").write_text("")
    backend.check_prepared(run)
    run.sub("data", "train.jsonl").write_text(json.dumps({**pair, "non_preferred_output": []}) + "\n")
    with pytest.raises(TuneforgeError, match=r"train.jsonl line 1: \[preference_output_count\]"):
        backend.check_prepared(run)


def test_train_uploads_from_the_report_it_is_given_and_never_prepares(tmp_path, monkeypatch, capsys):
    """The CLI prepares and hands the report in (recipes never run one another): a job recorded for that report's data
    is re-attached to and watched; cancelling needs no report."""
    from tuneforge.run import RunDir

    experiment = _experiment(poll_seconds=1)
    run = RunDir(experiment, tmp_path / "run")
    for name in ("train.jsonl", "valid.jsonl"):
        (run.sub("data") / name).parent.mkdir(parents=True, exist_ok=True)
        run.sub("data", name).write_text("")
    report = {"sha256": DATA, "openai": ESTIMATE}
    backend.write_state(run, {"key": backend.job_key(experiment, DATA), "job_id": "ftjob-1"})
    client, calls = _flaky_api(failures=0)
    monkeypatch.setattr(backend, "make_client", lambda experiment: client)
    assert backend.train_openai(experiment, run, report) == 0
    out = capsys.readouterr().out
    assert "re-attached to job ftjob-1 (already succeeded)" in out and "preparing" not in out
    assert calls["job"] == 2  # found by the key of the report's data, then watched
    with pytest.raises(TuneforgeError, match="nothing to cancel"):
        backend.train_openai(experiment, RunDir(experiment, tmp_path / "other"), None, cancel=True)


def test_an_imported_reinforcement_job_becomes_a_grpo_experiment_graded_by_the_same_grader(tmp_path):
    from tuneforge.config import load_experiment
    from tuneforge.train.openai_import import experiment_yaml

    grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "{{item.a}}"}
    grader["operation"] = "eq"
    hyperparameters = {"n_epochs": 2, "batch_size": 4, "compute_multiplier": 2.0, "eval_interval": 5}
    job = {
        "id": "ftjob-1",
        "model": "o4-mini-2025-04-16",
        "status": "succeeded",
        "fine_tuned_model": "ft:o4-mini-2025-04-16:org::abc",
        "seed": 9,
        "method": {
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {**hyperparameters, "reasoning_effort": "high"}},
        },
    }
    text = experiment_yaml(job, "builtin:smollm2-135m-instruct", has_valid=True)
    assert "reasoning_effort high: not carried over" in text  # said, not silently dropped
    (tmp_path / "experiment.yaml").write_text(text)
    experiment = load_experiment(tmp_path / "experiment.yaml")
    train = experiment.train
    assert (train.method, train.grpo.grader, train.grpo.generations) == ("grpo", grader, 8)
    assert (train.epochs, train.batch_size, train.eval_every) == (2, 4, 5)
    assert experiment.eval.graders == [grader] and experiment.eval.data.endswith("valid.jsonl")
    assert "openai:ft:o4-mini-2025-04-16:org::abc" in experiment.eval.systems
    with pytest.raises(TuneforgeError, match="carries no grader"):
        experiment_yaml({**job, "method": {"type": "reinforcement"}}, "builtin:x", False)


def test_a_reinforcement_jobs_result_file_has_the_reward_columns():
    from tuneforge.serve.wire import step_metrics_csv

    records = [
        {"step": 1, "loss": 0.1, "reward": 0.5, "reward_std": 0.2, "reward_g": 0.5, "kl": 0.0, "completion_length": 3},
        {"step": 1, "eval_reward": 0.75},
        {"step": 2, "loss": 0.2, "reward": 1.0, "reward_std": 0.0, "reward_g": 1.0, "kl": 0.01, "completion_length": 2},
    ]
    rows = step_metrics_csv(records, "reinforcement").decode().splitlines()
    assert rows == [
        "step,train_loss,train_reward_mean,train_reward_std,train_reward_g,kl,completion_length,valid_reward_mean",
        "1,0.1,0.5,0.2,0.5,0,3,0.75",
        "2,0.2,1,0,1,0.01,2,",
    ]
    supervised = step_metrics_csv([{"step": 1, "loss": 0.5, "token_accuracy": 0.9}, {"step": 1, "eval_loss": 0.4}])
    assert supervised.decode().splitlines()[1] == "1,0.5,0.9,0.4,"
