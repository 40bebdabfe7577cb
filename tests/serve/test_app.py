"""The HTTP surface through the real `openai` client: files, errors, auth, idempotency, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from ..conftest import REPO
from .conftest import all_events, wait_for_status


def test_a_bad_upload_names_its_rows_and_a_job_on_it_fails_validating_without_running(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    rows = [json.loads(line) for line in train.read_text().splitlines()[:6]]
    rows[1] = {**rows[1], "non_preferred_output": rows[1]["preferred_output"]}  # identical completions
    del rows[4]["input"]  # row 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")

    uploaded = client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert uploaded.status == "error"
    details = uploaded.status_details
    assert details.startswith("3 bad row(s): row 2: identical completions"), details
    assert "; row 5: missing field 'input'; row 7: malformed JSON" in details
    assert client.files.retrieve(uploaded.id).status_details == uploaded.status_details

    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, method={"type": "dpo"})
    assert job.status == "validating_files"
    job = wait_for_status(client, job.id, ("failed",), timeout=30)
    assert job.error.param == "training_file" and "row 2: identical completions" in job.error.message
    assert any(e.level == "error" and "Validation failed" in e.message for e in all_events(client, job.id))
    assert not (server.state_dir / "jobs" / job.id / "run.log").exists()  # no process was started


def test_config_errors_are_400s_naming_the_key_and_say_not_to_retry(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    cases = [
        ({"extra_body": {"dpo_lora": {"lora": {"rnak": 8}}}}, "lora.rnak", "unknown config key 'lora.rnak'"),
        ({"extra_body": {"dpo_lora": {"train.lr": "fast"}}}, "train.lr", "config key 'train.lr' must be float"),
        ({"extra_body": {"dpo_lora": {"output_dir": "/tmp/x"}}}, "output_dir", "set by the service"),
        ({"extra_body": {"dpo_lora": {"gpus": 2}}}, "gpus", "from 1 to 1"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 0}}}}, "batch_size", "positive"),
        ({"method": {"type": "supervised"}}, "method", "not supported"),
        ({"model": "gpt-4o-mini"}, "model", "bases: tiny-llama"),
        ({"training_file": "file-nope"}, "training_file", "no file 'file-nope'"),
    ]
    for options, param, message in cases:
        request = {"model": "tiny-llama", "training_file": file_id, **options}
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**request)
        error = caught.value.body
        assert error["param"] == param and message in error["message"], (options, error)
        assert caught.value.response.headers["x-should-retry"] == "false"
    assert client.fine_tuning.jobs.list().data == []


def test_hyperparameters_auto_resolve_and_are_echoed(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    hyper = {"beta": 0.25, "batch_size": 8, "learning_rate_multiplier": 2, "n_epochs": "auto"}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, seed=7, method={"type": "dpo", "dpo": {"hyperparameters": hyper}},
        extra_body={"dpo_lora": {"lora": {"r": 4}, "train.max_steps": 1}},
    )  # fmt: skip
    assert job.method.dpo.hyperparameters.model_dump() == {
        "beta": 0.25, "batch_size": 8, "learning_rate_multiplier": 2.0, "n_epochs": 1.0,
    }  # fmt: skip
    assert job.hyperparameters.batch_size == 8 and job.seed == 7
    client.fine_tuning.jobs.cancel(job.id)


def test_wrong_or_missing_token_gets_401(servers, tiny_setup):
    models, config, _, _ = tiny_setup
    server = servers(models, config)
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong-key").fine_tuning.jobs.list()
    assert caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/fine_tuning/jobs")
    assert missing.value.code == 401
    assert server.client().fine_tuning.jobs.list().data == []
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as health:
        assert json.load(health)["status"] == "ok"


def test_without_a_key_the_server_refuses_to_bind_beyond_loopback(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "DPO_LORA_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "dpo_lora", "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dpo-lora: error: --host 0.0.0.0: set DPO_LORA_API_KEY or --api-keys to serve beyond loopback (no key: 127.0.0.1 only)"
    ]


def test_an_idempotent_create_queues_the_job_once(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    request = {"model": "tiny-llama", "training_file": file_id, "extra_body": {"dpo_lora": {"train.max_steps": 1}}}
    first = client.fine_tuning.jobs.create(**request, extra_headers={"Idempotency-Key": "retry-1"})
    again = client.fine_tuning.jobs.create(**request, extra_headers={"Idempotency-Key": "retry-1"})
    assert again.id == first.id
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.create(**{**request, "seed": 3}, extra_headers={"Idempotency-Key": "retry-1"})
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [job.id for job in client.fine_tuning.jobs.list().data] == [first.id]


def test_fifty_parallel_creates_lists_and_event_reads_leave_the_store_consistent(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client(timeout=120)
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    request = {"model": "tiny-llama", "training_file": file_id, "extra_body": {"dpo_lora": {"train.max_steps": 1}}}
    first = client.fine_tuning.jobs.create(**request)

    def call(i: int):
        if i % 5 == 0:  # the same retried request: one job for all of them
            return client.fine_tuning.jobs.create(**request, extra_headers={"Idempotency-Key": "shared"}).id
        if i % 5 == 1:
            return client.fine_tuning.jobs.list(limit=100).data
        if i % 5 == 2:
            return client.fine_tuning.jobs.list_events(first.id).data
        return client.fine_tuning.jobs.create(**request).id

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, range(50)))
    created = [results[i] for i in range(50) if i % 5 in (3, 4)]
    shared = {results[i] for i in range(50) if i % 5 == 0}
    assert len(shared) == 1 and len(set(created)) == len(created) == 20
    listed = [job.id for job in client.fine_tuning.jobs.list(limit=7)]
    assert sorted(listed) == sorted([first.id, *created, *shared])  # every job once, across pages
    for job_id in listed:
        messages = [e.message for e in all_events(client, job_id)]
        assert messages[0] == f"Created fine-tuning job: {job_id}"
        assert len(messages) == len(set(messages)) or "Step" in " ".join(messages)
    for job_id in listed:
        client.fine_tuning.jobs.cancel(job_id)
    deadline = time.monotonic() + 120
    while server.job_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.job_pids() == []
    assert {job.status for job in client.fine_tuning.jobs.list(limit=100).data} <= {"cancelled", "succeeded"}


def test_a_second_server_on_the_same_state_dir_or_port_is_refused_in_one_line(servers, tiny_setup):
    models, config, _, _ = tiny_setup
    server = servers(models, config)
    for extra, message in (
        (["--state-dir", str(server.state_dir), "--port", "0"], "another dpo-lora serve uses it"),
        (["--state-dir", str(server.state_dir.parent / "other"), "--port", str(server.port)], "cannot bind"),
        (["--state-dir", str(server.state_dir.parent / "other"), "--port", "0", "--db", "nosuchdb://x"], "job store"),
    ):
        result = subprocess.run([sys.executable, "-m", "dpo_lora", "serve", "--models", str(models), *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_files_list_by_cursor_read_back_and_delete(servers, tiny_setup):
    models, config, train, evaluation = tiny_setup
    client = servers(models, config).client()
    uploaded = [client.files.create(file=path.open("rb"), purpose="fine-tune") for path in (train, evaluation, train)]
    first_page = client.files.list(limit=2)
    assert [f.id for f in first_page.data] == [uploaded[2].id, uploaded[1].id] and first_page.has_more
    assert [f.id for f in client.files.list(limit=2)] == [f.id for f in reversed(uploaded)]  # across pages
    assert [f.id for f in client.files.list(order="asc")] == [f.id for f in uploaded]
    assert client.files.content(uploaded[1].id).content == evaluation.read_bytes()
    assert uploaded[1].bytes == len(evaluation.read_bytes()) and uploaded[1].filename == "eval.jsonl"
    deleted = client.files.delete(uploaded[0].id)
    assert deleted.deleted and deleted.id == uploaded[0].id
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(uploaded[0].id)
    assert caught.value.body["code"] == "not_found"
    assert [f.id for f in client.files.list()] == [uploaded[2].id, uploaded[1].id]


def test_an_upload_with_expires_after_is_deleted_once_it_expires(servers, tiny_setup):
    """OpenAI's `expires_after` (an hour to 30 days from created_at): echoed as expires_at; the
    scheduler deletes the row and the file when it passes (here: moved to the past in the store).
    Out-of-range or other anchors are 400s naming the field."""
    from sqlalchemy import create_engine, text

    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    kept = client.files.create(file=train.open("rb"), purpose="fine-tune")
    expiring = client.files.create(file=train.open("rb"), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
    assert kept.expires_at is None and expiring.expires_at == expiring.created_at + 3600
    for bad, param in (({"anchor": "created_at", "seconds": 59}, "expires_after.seconds"),
                       ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=train.open("rb"), purpose="fine-tune", expires_after=bad)
        assert caught.value.body["param"] == param
    stored = server.state_dir / "files" / f"{expiring.id}.jsonl"
    assert stored.is_file()
    engine = create_engine(server.db_url())
    with engine.begin() as db:
        db.execute(
            text("UPDATE files SET expires_at = :t WHERE id = :id"), {"t": int(time.time()) - 1, "id": expiring.id}
        )
    engine.dispose()
    deadline = time.monotonic() + 30
    while expiring.id in {f.id for f in client.files.list()}:
        assert time.monotonic() < deadline, "the expired file was not deleted"
        time.sleep(0.3)
    assert not stored.exists() and [f.id for f in client.files.list()] == [kept.id]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(expiring.id)


def test_a_wandb_integration_is_checked_echoed_and_its_job_logs_to_that_wandb_run(servers, tiny_setup, tmp_path):
    """OpenAI's `integrations: [{"type": "wandb", ...}]` become the job's wandb.* knobs. A server with no
    W&B key refuses an online run before queueing it; offline (no network here) the job's rows land
    in a real W&B run file in its folder, under the project, name and tags asked for."""
    from ..train.test_wandb_log import offline_runs

    models, config, train, _ = tiny_setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"NETRC": str(tmp_path / "no-netrc")}
    client = servers(models, config, env=env).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    wandb = {"project": "dpo-lora-tests", "name": "served", "tags": ["ci"]}
    create = dict(model="tiny-llama", training_file=file_id, integrations=[{"type": "wandb", "wandb": wandb}])
    too_long = [{"type": "wandb", "wandb": {**wandb, "tags": ["x" * 65]}}]
    for extra, integrations, param, message in (
        ({}, None, "integrations", "no W&B key here: set WANDB_API_KEY"),
        ({"wandb": {"project": "other"}}, None, "integrations", "give one"),
        ({"wandb.mode": "offline"}, too_long, "wandb.tags", "each tag must be 1-64 characters"),
    ):
        request = {**create, "integrations": integrations or create["integrations"]}
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**request, extra_body={"dpo_lora": extra})
        assert caught.value.body["param"] == param and message in caught.value.body["message"], caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id, integrations=[{"type": "slack"}])
    assert caught.value.body["param"].startswith("integrations.0")

    job = client.fine_tuning.jobs.create(**create, extra_body={"dpo_lora": {"wandb.mode": "offline"}})
    assert [i.model_dump() for i in job.integrations] == [{"type": "wandb", "wandb": {**wandb, "entity": None}}]
    job = wait_for_status(client, job.id, ("succeeded",), timeout=300)
    assert client.fine_tuning.jobs.retrieve(job.id).integrations[0].wandb.project == "dpo-lora-tests"
    run = tmp_path / "state" / "jobs" / job.id / "run"
    (logged,) = offline_runs(run)
    assert (logged["project"], logged["name"], logged["tags"]) == ("dpo-lora-tests", "served", ["ci"])
    assert sorted(logged["history"]) == list(range(1, 7)), "the job's six steps, one row each"


def test_jobs_list_by_metadata_as_openai_filters_it(servers, tiny_setup, store_url):
    """`jobs.list(metadata={...})` sends metadata[k]=v: every pair must match; metadata=null lists
    the jobs without any; the two forms together are a 400. On SQLite and PostgreSQL (JSON paths)."""
    models, config, train, _ = tiny_setup
    client = servers(models, config, "--db", store_url).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    made = {}
    for name, metadata in (("a1", {"team": "a", "run": "1"}), ("a2", {"team": "a", "run": "2"}), ("b", {"team": "b"}), ("none", None)):  # fmt: skip
        made[name] = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id, method={"type": "dpo"},
                                                    metadata=metadata, extra_body={"dpo_lora": {"train.max_steps": 1}}).id  # fmt: skip

    def listed(**query) -> list[str]:
        return sorted(name for name, job_id in made.items() if job_id in {j.id for j in client.fine_tuning.jobs.list(**query)})  # fmt: skip

    assert listed(metadata={"team": "a"}) == ["a1", "a2"]
    assert listed(metadata={"team": "a", "run": "2"}) == ["a2"]
    assert listed(metadata={"team": "c"}) == [] and listed() == ["a1", "a2", "b", "none"]
    assert listed(extra_query={"metadata": "null"}) == ["none"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.get("/fine_tuning/jobs?metadata=null&metadata[team]=a", cast_to=object)
    assert caught.value.body["param"] == "metadata"
