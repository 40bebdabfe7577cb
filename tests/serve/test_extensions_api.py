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
