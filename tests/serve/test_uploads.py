"""OpenAI's Uploads (/v1/uploads) through the real `openai` client against a real server: a file
sent in parts becomes a File a job trains on; every misuse is a 4xx that leaves nothing behind."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from sqlalchemy import create_engine, text

from .conftest import wait_for_status
from .test_hostile import _status
from .test_scheduler import create


def test_a_file_sent_in_parts_is_the_file_a_job_trains_on(servers, tiny_setup):
    """`upload_file_chunked` splits the training file in three parts, completes with its MD5: the
    File holds the same bytes, checked row by row, and a job trains on it. The parts are gone."""
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    size = train.stat().st_size
    upload = client.uploads.upload_file_chunked(
        file=train, mime_type="application/jsonl", purpose="fine-tune", part_size=size // 3 + 1,
        md5=hashlib.md5(train.read_bytes()).hexdigest(),
    )  # fmt: skip
    assert upload.status == "completed" and upload.bytes == size and upload.file.status == "processed"
    assert client.files.content(upload.file.id).content == train.read_bytes()
    assert [f.id for f in client.files.list()] == [upload.file.id]
    assert list((server.state_dir / "uploads").iterdir()) == []
    job = create(client, upload.file.id, {"train.max_steps": 1})
    assert wait_for_status(client, job.id, ("succeeded",)).trained_tokens > 0


def test_a_misused_upload_is_a_400_naming_the_field_and_keeps_nothing(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    data = train.read_bytes()
    half = len(data) // 2
    server = servers(models, config, "--project-storage", str(5 * len(data) // 2))
    client = server.client()

    def new_upload(size: int = len(data)):
        return client.uploads.create(bytes=size, filename="pairs.jsonl", mime_type="application/jsonl", purpose="fine-tune")  # fmt: skip

    def refused(call, status: int = 400):
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status, caught.value.body
        return caught.value.body

    upload = new_upload()
    first = client.uploads.parts.create(upload.id, data=data[:half])
    # A part past the announced bytes; part ids that are not this upload's (a path among them).
    assert refused(lambda: client.uploads.parts.create(upload.id, data=data))["param"] == "data"
    for part_ids in ([first.id, "../../files"], [first.id, first.id], ["part-" + "0" * 24]):
        assert refused(lambda: client.uploads.complete(upload.id, part_ids=part_ids))["param"] == "part_ids"  # noqa: B023
    body = refused(lambda: client.uploads.complete(upload.id, part_ids=[first.id]))
    assert body["param"] == "part_ids" and f"created for {len(data)}" in body["message"]
    second = client.uploads.parts.create(upload.id, data=data[half:])
    body = refused(lambda: client.uploads.complete(upload.id, part_ids=[first.id, second.id], md5="0" * 32))
    assert body["param"] == "md5" and hashlib.md5(data).hexdigest() in body["message"]
    # The parts in the wrong order join to other bytes: a bad file, named row by row, not a crash.
    swapped = client.uploads.complete(upload.id, part_ids=[second.id, first.id])
    assert swapped.status == "completed" and swapped.file.status == "error"
    assert refused(lambda: client.uploads.complete(upload.id, part_ids=[first.id, second.id]))["param"] == "upload_id"
    assert refused(lambda: client.uploads.parts.create(upload.id, data=b"x"))["param"] == "upload_id"

    # Another project's upload is a 404 on every route; a cancelled one takes no parts.
    cancelled = new_upload()
    client.uploads.parts.create(cancelled.id, data=data[:half])
    assert client.uploads.cancel(cancelled.id).status == "cancelled"
    assert refused(lambda: client.uploads.parts.create(cancelled.id, data=b"x"))["param"] == "upload_id"
    assert refused(lambda: client.uploads.cancel(cancelled.id))["param"] == "upload_id"
    assert refused(lambda: client.uploads.cancel("upload-" + "0" * 24), 404)["code"] == "not_found"
    # --project-storage (2.5 files) counts a pending upload's announced bytes: beside the swapped
    # file one more fits, a second would not.
    held = new_upload()
    assert refused(lambda: new_upload(), 413)["code"] == "storage_quota_exceeded"
    # An upload an hour old expires: no more parts, and the scheduler removes what it had.
    client.uploads.parts.create(held.id, data=data[:half])
    engine = create_engine(server.db_url())
    with engine.begin() as db:
        db.execute(text("UPDATE uploads SET expires_at = 0 WHERE id = :id"), {"id": held.id})
    engine.dispose()
    assert "expired" in refused(lambda: client.uploads.parts.create(held.id, data=b"x"))["message"]
    deadline = time.monotonic() + 30
    while (server.state_dir / "uploads" / held.id).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(p.name for p in (server.state_dir / "uploads").iterdir()) == []
    assert [f.id for f in client.files.list()] == [swapped.file.id]


def test_two_completes_at_once_make_one_file(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    data = train.read_bytes()
    upload = client.uploads.create(bytes=len(data), filename="p.jsonl", mime_type="application/jsonl", purpose="fine-tune")  # fmt: skip
    part = client.uploads.parts.create(upload.id, data=data)
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda _: _status(lambda: client.uploads.complete(upload.id, part_ids=[part.id])), range(4)))  # fmt: skip
    assert statuses == [200, 400, 400, 400]
    assert len(client.files.list().data) == 1


def test_another_projects_upload_is_a_404_on_every_route(servers, tiny_setup, tmp_path):
    import json

    from .test_hostile import KEYS

    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = servers(models, config, "--api-keys", str(keys))
    a, b = server.client(KEYS["team-a"]), server.client(KEYS["team-b"])
    data = train.read_bytes()
    upload = a.uploads.create(bytes=len(data), filename="p.jsonl", mime_type="application/jsonl", purpose="fine-tune")  # fmt: skip
    part = a.uploads.parts.create(upload.id, data=data)
    for call in (lambda: b.uploads.parts.create(upload.id, data=b"x"), lambda: b.uploads.cancel(upload.id),
                 lambda: b.uploads.complete(upload.id, part_ids=[part.id])):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    completed = a.uploads.complete(upload.id, part_ids=[part.id])
    assert [f.id for f in a.files.list()] == [completed.file.id] and b.files.list().data == []
