"""`dpo-lora serve` under a hostile client: raw sockets and the real `openai` client against a real
server on loopback, one test per hole the probes found (each failed before the fix). Every request
loop is bounded in count and time."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from .conftest import API_KEY, wait_for_status
from .test_scheduler import create, wait_for_event


def raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send `request` as it is on a fresh connection; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def http(port: int, method: str, path: str, body: bytes = b"", host: str | None = None, **headers) -> bytes:
    fields = {"Host": host or f"127.0.0.1:{port}", "Connection": "close"}
    fields |= {name.replace("_", "-"): value for name, value in headers.items()}
    if body or method == "POST":
        fields.setdefault("Content-Length", str(len(body)))
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def job_folders(server) -> list[Path]:
    return sorted((server.state_dir / "jobs").glob("*")) if (server.state_dir / "jobs").is_dir() else []


# -- 1. no file written outside the state dir --------------------------------------------------
def test_a_job_cannot_name_a_deepspeed_config_and_picks_a_shipped_one_by_name(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    exploit = {"flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(victim)},
               "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "outside"), "job_name": "x"}}  # fmt: skip
    uploaded = client.files.create(file=("ds.json", json.dumps(exploit).encode()), purpose="user_data")
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    for extra in ({"deepspeed": f"../../files/{uploaded.id}.json"}, {"deepspeed": str(victim)},
                  {"lora": {"init_adapter": str(tmp_path)}}, {"data.num_proc": 64}):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            create(client, file_id, extra)
        assert "set by the service" in caught.value.body["message"], extra
    job = create(client, file_id, {"train.max_steps": 1, "zero_stage": 1})
    wait_for_status(client, job.id, ("succeeded",))
    folder = server.state_dir / "jobs" / job.id
    written = json.loads((folder / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == 1 and "flops_profiler" not in written
    assert f"deepspeed: {folder / 'deepspeed.json'}" in (folder / "config.yaml").read_text()
    assert victim.read_text() == "precious" and not (tmp_path / "outside").exists()


# -- 2. open event streams do not starve the API -----------------------------------------------
def test_sixty_open_event_streams_leave_the_api_answering_and_the_next_gets_429(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config, "--max-streams", "60")
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    job = create(client, file_id, {"train.max_steps": 10_000})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    streams = []
    try:
        for _ in range(60):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(http(server.port, "GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", **auth))
            streams.append(conn)
        for conn in streams:  # each one answered and is open
            assert conn.recv(4096).startswith(b"HTTP/1.1 200"), "a stream was not answered"
        for path, extra in (("/healthz", {}), (f"/v1/fine_tuning/jobs/{job.id}", auth)):
            started = time.monotonic()
            status, _, _ = raw(server.port, http(server.port, "GET", path, **extra), timeout=5)
            assert status == 200 and time.monotonic() - started < 1.0, path
        status, _, body = raw(server.port, http(server.port, "GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream",
                                                **auth))  # fmt: skip
        assert status == 429 and "at most 60 event streams" in json.loads(body)["error"]["message"]
    finally:
        for conn in streams:
            conn.close()
    deadline = time.monotonic() + 20  # closed streams give their places back
    while True:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(http(server.port, "GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", **auth))
            if conn.recv(4096).startswith(b"HTTP/1.1 200"):
                break
        assert time.monotonic() < deadline, "closed streams still count against the cap"
        time.sleep(0.5)
    client.fine_tuning.jobs.cancel(job.id)


# -- 3. the reserved-key guard and the loader read keys alike ----------------------------------
def test_spellings_the_loader_used_to_normalise_are_refused(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    for extra in ({" model.trust_remote_code": True}, {"model.trust_remote_code=true #": 0},
                  {"model": {" trust_remote_code": True}}, {"model.trust_remote_code ": True}):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            create(client, file_id, extra)
        assert "is not a dotted name" in caught.value.body["message"], extra
    assert client.fine_tuning.jobs.list().data == [] and job_folders(server) == []


# -- 4. authenticate before reading a body; cap bodies -----------------------------------------
def test_bodies_are_refused_before_they_are_read_and_capped_after(servers, tiny_setup):
    models, config, _, _ = tiny_setup
    server = servers(models, config, "--max-upload-size", "1MiB")
    boundary = "x" * 16
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    # 50 MB announced, not one byte sent: the 401 comes at once, nothing is spooled.
    status, headers, _ = raw(
        server.port, http(server.port, "POST", "/v1/files", Content_Length="50000000", **multipart)
    )
    assert status == 401 and headers["x-should-retry"] == "false"
    status, _, _ = raw(server.port, http(server.port, "POST", "/v1/fine_tuning/jobs", b"{not json",
                                         Content_Type="application/json"))  # fmt: skip
    assert status == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, _, body = raw(server.port, http(server.port, "POST", "/v1/files", Content_Length="2000000", **auth,
                                            **multipart))  # fmt: skip
    assert status == 413 and "limit of 1048576 bytes" in json.loads(body)["error"]["message"]
    # No length announced (chunked): counted as it arrives.
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n").encode() + b"a" * 1_500_000  # fmt: skip
    chunked = b"".join(f"{len(part[i:i + 65536]):x}\r\n".encode() + part[i:i + 65536] + b"\r\n"
                       for i in range(0, len(part), 65536)) + b"0\r\n\r\n"  # fmt: skip
    status, _, _ = raw(server.port, http(server.port, "POST", "/v1/files", chunked, Transfer_Encoding="chunked",
                                         **auth, **multipart).replace(b"Content-Length: ", b"X-Ignored: "))  # fmt: skip
    assert status == 413
    big_json = json.dumps({"model": "tiny-llama", "training_file": "f", "metadata": {"k": "v" * 2_000_000}}).encode()
    status, _, _ = raw(server.port, http(server.port, "POST", "/v1/fine_tuning/jobs", big_json, **auth,
                                         Content_Type="application/json"))  # fmt: skip
    assert status == 413
    assert list((server.state_dir / "files").glob("*")) == [] if (server.state_dir / "files").exists() else True


# -- 5. without a key: loopback Host and same-origin only --------------------------------------
def test_a_keyless_server_refuses_foreign_hosts_and_cross_site_requests(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config, api_key=None)
    port = server.port
    job_path = "/v1/fine_tuning/jobs"
    assert raw(port, http(port, "GET", job_path))[0] == 200
    assert raw(port, http(port, "GET", job_path, host=f"localhost:{port}"))[0] == 200
    assert raw(port, http(port, "GET", job_path, Origin=f"http://127.0.0.1:{port}"))[0] == 200
    assert raw(port, http(port, "GET", job_path, host=f"attacker.example:{port}"))[0] == 403  # DNS rebinding
    status, _, body = raw(port, http(port, "POST", f"{job_path}/ftjob-x/cancel", b"x", Content_Type="text/plain",
                                     Origin="http://attacker.example"))  # fmt: skip
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden_origin"
    assert raw(port, http(port, "POST", "/v1/files", b"", Sec_Fetch_Site="cross-site"))[0] == 403
    assert raw(port, http(port, "GET", "/healthz", host="attacker.example"))[0] == 403
    assert server.client().files.create(file=train.open("rb"), purpose="fine-tune").status == "processed"


# -- smaller holes -----------------------------------------------------------------------------
def test_malformed_requests_are_json_400s_that_say_not_to_retry_and_leave_nothing(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    deep_row = tmp_path / "deep.jsonl"
    deep_row.write_text("[" * 10_000 + "]" * 10_000 + "\n")
    uploaded = client.files.create(file=deep_row.open("rb"), purpose="fine-tune")
    assert uploaded.status == "error" and "row 1: malformed JSON: nested too deeply" in uploaded.status_details
    deep: dict = {}
    for _ in range(900):
        deep = {"a": deep}
    hyper = '{"type": "dpo", "dpo": {"hyperparameters": {%s}}}'
    cases = [  # JSON as a hostile client writes it: NaN and Infinity are what Python's json reads
        (f'"dpo_lora": {json.dumps(deep)}', "dpo_lora"),
        ('"seed": 1208925819614629174706176', "seed"),
        ('"method": ' + hyper % '"beta": NaN', "beta"),
        ('"method": ' + hyper % '"learning_rate_multiplier": Infinity', "learning_rate_multiplier"),
        ('"method": ' + hyper % '"n_epochs": 0.25', "n_epochs"),
        ('"dpo_lora": {"dpo.beta": -1}', "dpo.beta"),
        ('"dpo_lora": {"train.lr": NaN}', "train.lr"),
    ]
    auth = {"Authorization": f"Bearer {API_KEY}", "Content_Type": "application/json"}
    for fragment, param in cases:
        body = f'{{"model": "tiny-llama", "training_file": "{file_id}", {fragment}}}'.encode()
        status, headers, answer = raw(server.port, http(server.port, "POST", "/v1/fine_tuning/jobs", body, **auth))
        assert (status, headers.get("x-should-retry")) == (400, "false"), (fragment, answer[:300])
        assert json.loads(answer)["error"]["param"] == param, (fragment, answer[:300])
    for limit in ("-1", "0", "1e20", "100000000000000000000"):
        with pytest.raises(openai.BadRequestError):
            client.get(f"/dashboard/jobs?limit={limit}", cast_to=object)
    batch = client.files.create(file=train.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=batch.id)
    assert caught.value.body["param"] == "training_file" and "purpose 'batch'" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=train.open("rb"), purpose="fine-tune-results")
    for path in ("/fine_tuning/jobs/ftjob-none/exports/ftexport-none/content",  # made-up ids, and one
                 "/fine_tuning/jobs/ftjob-none/exports/..%2f..%2fconfig.yaml/content"):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            client.get(path, cast_to=bytes)
    assert client.fine_tuning.jobs.list().data == [] and job_folders(server) == []


def test_a_job_paused_before_validation_resumes_to_the_end(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    for _ in range(10):  # the scheduler validates within half a second: pause before it does
        job = create(client, file_id, {"train.max_steps": 2})
        client.fine_tuning.jobs.pause(job.id)
        if not (server.state_dir / "jobs" / job.id / "train.jsonl").exists():
            break
        client.fine_tuning.jobs.cancel(job.id)
    else:
        pytest.fail("the scheduler validated every job before its pause")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    client.fine_tuning.jobs.resume(job.id)
    assert wait_for_status(client, job.id, ("succeeded",)).status == "succeeded"


def test_cancel_stops_the_run_before_it_answers_so_no_step_or_checkpoint_follows(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    job = create(client, file_id, {"train": {"max_steps": 10_000, "save_every": 1}})
    wait_for_event(client, job.id, "Checkpoint created at step 2")
    run = server.state_dir / "jobs" / job.id / "run"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    at_cancel = sorted(p.name for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    rows_at_cancel = (run / "metrics.jsonl").read_text().count("\n")
    wait_for_event(client, job.id, "The job was cancelled", timeout=60)
    time.sleep(1.0)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*/COMPLETE")) == at_cancel
    assert (run / "metrics.jsonl").read_text().count("\n") == rows_at_cancel  # no step after `cancelled`


def test_a_deleted_job_leaves_nothing_and_its_caches_stay_in_its_folder(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    user_cache = tmp_path / "user-cache"
    env = {**__import__("os").environ, "DPO_LORA_CACHE": str(user_cache)}
    server = servers(models, config, env=env)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    done = create(client, file_id, {"train.max_steps": 1})
    wait_for_status(client, done.id, ("succeeded",))
    folder = server.state_dir / "jobs" / done.id
    assert any((folder / "cache" / "tokenized").iterdir()) and not user_cache.exists()
    running = create(client, file_id, {"train.max_steps": 10_000})
    wait_for_status(client, running.id, ("running",))
    with pytest.raises(openai.ConflictError):  # a running job is not deleted
        client.delete(f"/fine_tuning/jobs/{running.id}", cast_to=object)
    client.fine_tuning.jobs.cancel(running.id)
    wait_for_event(client, running.id, "The job was cancelled", timeout=60)
    for job_id in (running.id, done.id):
        deleted = client.delete(f"/fine_tuning/jobs/{job_id}", cast_to=object)
        assert deleted == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve(job_id)
    assert job_folders(server) == []
    assert [f.purpose for f in client.files.list().data] == ["fine-tune"]  # its result file went with it


# -- projects: each API key sees only its own ----------------------------------------------------
KEYS = {"team-a": "a-key-0123456789abcdef", "team-b": "b-key-0123456789abcdef"}


def test_one_projects_key_reaches_nothing_of_anothers(servers, tiny_setup, tmp_path):
    """Two projects' keys (--api-keys) and DPO_LORA_API_KEY's `default`: B can't list, read, cancel,
    stream, export, train on, continue from or chat with anything of A's; every such request is the
    404 (or the 400 for a job's fields) that an id nobody made gets. A sees all of its own."""
    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = servers(models, config, "--api-keys", str(keys))
    a, b, default = server.client(KEYS["team-a"]), server.client(KEYS["team-b"]), server.client()
    file_a = a.files.create(file=train.open("rb"), purpose="fine-tune")
    job_a = a.fine_tuning.jobs.create(model="tiny-llama", training_file=file_a.id, method={"type": "dpo"},
                                      extra_body={"dpo_lora": {"train.max_steps": 2}}, extra_headers={"Idempotency-Key": "same"})  # fmt: skip
    job_a = wait_for_status(a, job_a.id, ("succeeded",))
    checkpoint = a.fine_tuning.jobs.checkpoints.list(job_a.id).data[0]
    results = job_a.result_files[0]
    assert {f.id for f in a.files.list()} == {file_a.id, results}
    assert [m.id for m in a.models.list()] == ["tiny-llama", job_a.fine_tuned_model]
    answer = a.chat.completions.create(model=job_a.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)  # fmt: skip
    assert answer.choices[0].message.content is not None

    for other in (b, default):
        assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
        assert [m.id for m in other.models.list()] == ["tiny-llama"]
        for call in (
            lambda c: c.files.retrieve(file_a.id), lambda c: c.files.content(results),
            lambda c: c.files.delete(file_a.id), lambda c: c.fine_tuning.jobs.retrieve(job_a.id),
            lambda c: c.fine_tuning.jobs.cancel(job_a.id), lambda c: c.fine_tuning.jobs.list_events(job_a.id),
            lambda c: c.fine_tuning.jobs.checkpoints.list(job_a.id),
            lambda c: c.fine_tuning.jobs.list(after=job_a.id),
            lambda c: c.get(f"/fine_tuning/jobs/{job_a.id}/checkpoints/{checkpoint.id}/adapter", cast_to=bytes),
            lambda c: c.get(f"/fine_tuning/jobs/{job_a.id}/events/stream", cast_to=bytes),
            lambda c: c.get(f"/fine_tuning/jobs/{job_a.id}/log", cast_to=object),
            lambda c: c.post(f"/fine_tuning/jobs/{job_a.id}/export", cast_to=object, body={}),
            lambda c: c.delete(f"/fine_tuning/jobs/{job_a.id}", cast_to=object),
            lambda c: c.chat.completions.create(model=job_a.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}]),  # fmt: skip
        ):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                call(other)
        for request in ({"training_file": file_a.id, "model": "tiny-llama"},
                        {"training_file": results, "model": "tiny-llama"},
                        {"training_file": file_a.id, "model": job_a.fine_tuned_model}):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as caught:
                other.fine_tuning.jobs.create(**request, method={"type": "dpo"})
            assert caught.value.body["param"] in ("training_file", "model")
        assert other.get("/dashboard/jobs", cast_to=object)["data"] == []
    # The same Idempotency-Key in another project makes that project's own job, not a replay of A's.
    file_b = b.files.create(file=train.open("rb"), purpose="fine-tune")
    job_b = b.fine_tuning.jobs.create(model="tiny-llama", training_file=file_b.id, method={"type": "dpo"},
                                      extra_body={"dpo_lora": {"train.max_steps": 1}}, extra_headers={"Idempotency-Key": "same"})  # fmt: skip
    assert job_b.id != job_a.id and [j.id for j in b.fine_tuning.jobs.list()] == [job_b.id]
    assert a.fine_tuning.jobs.retrieve(job_a.id).status == "succeeded" and a.files.retrieve(file_a.id).id == file_a.id
    with pytest.raises(openai.AuthenticationError):
        server.client("c-key-0123456789abcdef").files.list()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "expected a JSON object of projects and their keys"),
        ('{"team a": "0123456789abcdef"}', "project 'team a': names are 1-64 letters"),
        ('{"a": "short"}', "project 'a': its key must be a string of at least 16 characters"),
        ('{"a": "0123456789abcdef", "b": "0123456789abcdef"}', "project 'b': its key is another project's too"),
        (json.dumps({"a": API_KEY.ljust(16, "x")}), "project 'a': its key is another project's too"),
        ('{"default": "0123456789abcdef"}', "project 'default' is DPO_LORA_API_KEY's"),
        ("{", "not a JSON file"),
        ('{"a": {"key": "0123456789abcdef", "weight": 0}}', "project 'a': weight must be a number > 0, got 0"),
        ('{"a": {"key": "0123456789abcdef", "weight": "2"}}', "project 'a': weight must be a number > 0"),
        ('{"a": {"key": "0123456789abcdef", "share": 2}}', "project 'a': unknown field 'share'"),
        ('{"a": {"weight": 2}}', "project 'a': its key must be a string"),
    ],
)
def test_a_bad_keys_file_is_one_line_naming_the_entry(tmp_path, content, message):
    from dpo_lora.core.errors import UserError
    from dpo_lora.serve.projects import read_projects

    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(UserError, match=f"^--api-keys {path}: .*{message}"):
        read_projects(str(path), API_KEY.ljust(16, "x"))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"team-a": KEYS["team-a"], "team-b": {"key": KEYS["team-b"], "weight": 2.5}}))
    projects = read_projects(str(good), None)
    assert projects.keys == {key: project for project, key in KEYS.items()}
    assert projects.weights == {"team-a": 1.0, "team-b": 2.5}


def test_a_project_holds_at_most_its_storage_and_its_jobs(servers, tiny_setup, tmp_path):
    """--project-storage: an upload that would take a project past its bytes of files is a 413 and
    leaves nothing behind; deleting a file makes room. --project-jobs: a job past the project's count
    of jobs not yet final is OpenAI's 429; one ending makes room. Both count each project apart."""
    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    size = train.stat().st_size
    server = servers(models, config, "--api-keys", str(keys), "--project-storage", str(size * 5 // 2), "--project-jobs", "1")  # fmt: skip
    a, b = server.client(KEYS["team-a"]), server.client(KEYS["team-b"])
    kept = [a.files.create(file=train.open("rb"), purpose="fine-tune") for _ in range(2)]
    with pytest.raises(openai.APIStatusError) as caught:
        a.files.create(file=train.open("rb"), purpose="fine-tune")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "storage_quota_exceeded"
    assert "project 'team-a'" in caught.value.body["message"] and "--project-storage" in caught.value.body["message"]
    assert {f.id for f in a.files.list()} == {f.id for f in kept}
    file_b = b.files.create(file=train.open("rb"), purpose="fine-tune")  # B's bytes are B's own
    on_disk = {p.name.split(".")[0] for p in (server.state_dir / "files").iterdir()}
    assert on_disk == {kept[0].id, kept[1].id, file_b.id}  # the refused upload left no file
    a.files.delete(kept[1].id)
    kept[1] = a.files.create(file=train.open("rb"), purpose="fine-tune")

    first = create(a, kept[0].id, {"train.max_steps": 500})
    with pytest.raises(openai.RateLimitError) as caught:
        create(a, kept[0].id, {"train.max_steps": 1})
    assert caught.value.body["code"] == "rate_limit_exceeded" and "--project-jobs" in caught.value.body["message"]
    assert [j.id for j in a.fine_tuning.jobs.list()] == [first.id]
    assert create(b, file_b.id, {"train.max_steps": 1}).status == "validating_files"
    a.fine_tuning.jobs.cancel(first.id)
    wait_for_status(a, first.id, ("cancelled",), timeout=120)
    assert create(a, kept[1].id, {"train.max_steps": 1}).status == "validating_files"


def test_concurrent_requests_admit_no_more_than_the_caps(servers, tiny_setup, store_url, tmp_path):
    """Six uploads and six creates of one project at once, on one server (SQLite) or split between two
    servers on one PostgreSQL database: the caps admit exactly what fits, no more. Each part fails
    when the count and the insert it admits are not under the project's lock."""
    models, config, train, _ = tiny_setup
    size = train.stat().st_size
    caps = ("--db", store_url, "--project-storage", str(size * 5 // 2), "--project-jobs", "1")
    clients = [servers(models, config, *caps, state_dir=tmp_path / "state-a").client()]
    if store_url.startswith("postgresql"):
        clients.append(servers(models, config, *caps, state_dir=tmp_path / "state-b").client())

    def upload(n: int) -> int:
        return _status(lambda: clients[n % len(clients)].files.create(file=train.open("rb"), purpose="fine-tune"))

    def start(n: int) -> int:
        return _status(lambda: create(clients[n % len(clients)], file_id, {"train.max_steps": 500}))

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(upload, range(6))) == [200] * 2 + [413] * 4
        file_id = clients[0].files.list().data[0].id
        assert sorted(pool.map(start, range(6))) == [200] + [429] * 5
    assert len(clients[0].fine_tuning.jobs.list().data) == 1 and len(clients[0].files.list().data) == 2


def _status(call) -> int:
    try:
        call()
    except openai.APIStatusError as err:
        return err.status_code
    return 200


def test_sighup_rereads_the_keys_file(servers, tiny_setup, tmp_path):
    """Keys are added, rotated and removed without a restart; a bad file keeps the keys as they were
    and says why in one line; the server lives on."""
    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"team-a": KEYS["team-a"]}))
    server = servers(models, config, "--api-keys", str(keys))
    file_a = server.client(KEYS["team-a"]).files.create(file=train.open("rb"), purpose="fine-tune")
    rotated = {"team-a": "a-key-rotated-0123456789", "team-b": KEYS["team-b"]}
    keys.write_text(json.dumps(rotated))
    server.process.send_signal(signal.SIGHUP)

    def until(check) -> None:
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline and server.process.poll() is None, server.output()
            time.sleep(0.2)

    def works(key: str) -> bool:
        try:
            server.client(key).files.list()
        except openai.AuthenticationError:
            return False
        return True

    until(lambda: works(rotated["team-a"]))
    assert [f.id for f in server.client(rotated["team-a"]).files.list()] == [file_a.id]  # the same project
    assert not works(KEYS["team-a"]) and works(KEYS["team-b"]) and works(API_KEY)
    keys.write_text("{")
    server.process.send_signal(signal.SIGHUP)
    until(lambda: "SIGHUP: the keys stay as they were" in server.output())
    assert f"--api-keys {keys}: not a JSON file" in server.output()
    assert works(rotated["team-a"]) and works(KEYS["team-b"]) and server.process.poll() is None


def test_a_job_wanting_more_devices_than_a_project_may_hold_is_a_400(servers, tiny_setup):
    """With --project-devices 1 a two-rank job could never start: refused at create, naming the field."""
    models, config, train, _ = tiny_setup
    client = servers(models, config, "--cpu-slots", "2", "--project-devices", "1").client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, file_id, {"gpus": 2})
    assert caught.value.body["param"] == "gpus" and "one project may hold" in caught.value.body["message"]
    assert create(client, file_id, {"gpus": 1, "train.max_steps": 1}).status == "validating_files"


def test_a_key_past_its_rate_gets_429_with_retry_after_which_the_client_waits_out(servers, tiny_setup, tmp_path):
    """--rate-limit 20: a key's 21st request within 3 s (one request's refill) is a 429 naming the limit, with
    `retry-after`; another project's key is not slowed; the `openai` client with retries waits it
    out and succeeds."""
    models, config, _, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = servers(models, config, "--api-keys", str(keys), "--rate-limit", "20")
    a = server.client(KEYS["team-a"])
    statuses = [_status(lambda: a.models.list()) for _ in range(21)]
    assert statuses[:20] == [200] * 20 and statuses[20] == 429, statuses
    with pytest.raises(openai.RateLimitError) as caught:
        a.models.list()
    assert caught.value.response.headers["retry-after"] in ("1", "2", "3")
    assert "more than 20 requests a minute" in caught.value.body["message"]
    assert server.client(KEYS["team-b"]).models.list().data  # B's bucket is its own
    started = time.monotonic()
    assert server.client(KEYS["team-a"]).with_options(max_retries=3).models.list().data  # waited out, then answered
    assert time.monotonic() - started >= 0.5
