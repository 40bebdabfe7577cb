"""dpo-lora's routes beyond OpenAI's, in parts: the tar an export's content is streamed as. The routes
themselves run through the `openai` client in test_lifecycle_smollm2.py and test_hostile.py."""

from __future__ import annotations

import io
import tarfile

from dpo_lora.serve.extensions_api import tar_stream


def test_an_export_folder_streams_as_a_tar_that_tarfile_reads_back_exactly(tmp_path):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    files = {
        "config.json": b'{"a": 1}',
        "model.safetensors": bytes(range(256)) * 4097,  # several chunks, not a multiple of 512
        "sub/" + "long-name-" * 20 + ".txt": b"x",  # past ustar's 100 characters: a pax header
        "empty": b"",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "link").symlink_to(folder / "config.json")  # left out: it could point anywhere

    pieces = list(tar_stream(folder, "ftexport-1", chunk=1000))
    assert max(len(piece) for piece in pieces) <= 4096  # streamed, never the whole folder at once
    with tarfile.open(fileobj=io.BytesIO(b"".join(pieces))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == sorted(f"ftexport-1/{name}" for name in files)
        for name, data in files.items():
            assert tar.extractfile(members[f"ftexport-1/{name}"]).read() == data


def test_deleting_a_fine_tuned_model_removes_it_and_its_checkpoints_but_keeps_the_job(servers, tiny_setup):
    """`client.models.delete` (OpenAI's): the model and its checkpoint models no longer list, answer,
    export or start a job; their adapters are gone from disk; the job and its record stay. A base
    is a 403, a checkpoint id a 400, another delete a 404."""
    import openai
    import pytest

    from .conftest import wait_for_status
    from .test_scheduler import create

    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    job = wait_for_status(client, create(client, file_id, {"train.max_steps": 2, "train.save_every": 1}).id, ("succeeded",))  # fmt: skip
    model = job.fine_tuned_model
    checkpoint_model = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    chat = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert client.chat.completions.create(model=checkpoint_model, **chat).choices
    run = server.state_dir / "jobs" / job.id / "run"
    assert (run / "adapter").is_dir() and any((run / "checkpoints").iterdir())

    for refused, status in ((lambda: client.models.delete("tiny-llama"), 403), (lambda: client.models.delete(checkpoint_model), 400)):  # fmt: skip
        with pytest.raises(openai.APIStatusError) as caught:
            refused()
        assert caught.value.status_code == status and caught.value.body["param"] == "model"
    deleted = client.models.delete(model)
    assert (deleted.id, deleted.deleted) == (model, True)
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    assert not (run / "adapter").exists() and list((run / "checkpoints").iterdir()) == []
    for name in (model, checkpoint_model):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, **chat)
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.create(model=name, training_file=file_id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError):
        client.post(f"/fine_tuning/jobs/{job.id}/export", cast_to=object, body={})
    with pytest.raises(openai.NotFoundError):
        client.models.delete(model)
    kept = client.fine_tuning.jobs.retrieve(job.id)
    assert kept.status == "succeeded" and kept.fine_tuned_model == model
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
