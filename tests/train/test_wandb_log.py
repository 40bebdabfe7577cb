"""W&B logging: a run's rows, resolved config and health warnings land in a real W&B run (offline
here: no network), and a stopped run's resume logs to the same W&B run."""

from __future__ import annotations

import signal
import struct
import sys

import pytest

from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import WANDB_RUN_ID
from dpo_lora.core.schema import WandbConfig
from dpo_lora.train.checkpoints import latest_checkpoint
from dpo_lora.train.loop import train
from dpo_lora.train.metrics import MetricsWriter

from .test_checkpoints import RUN, start_cli, train_rows, wait_for
from .test_loop import tiny_config

W_AND_B = ["wandb.project=dpo-lora-tests", "wandb.mode=offline", "wandb.tags=[ci, tiny]"]
BLOCK, HEADER = 32768, 7  # W&B's run file: LevelDB's log format, 32 KiB blocks, 7-byte record headers


def offline_runs(output_dir) -> list[dict]:
    """Each offline W&B run under OUTPUT_DIR/wandb, oldest first: its id, project, name, tags,
    config and history ({step: {key: value}}), read from W&B's own run file and record types."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for folder in sorted((output_dir / "wandb").glob("offline-run-*")):
        data = next(folder.glob("run-*.wandb")).read_bytes()
        position, pending, run = HEADER, b"", {"history": {}}  # the file's own header first
        while position + HEADER <= len(data):
            if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header is padding
                position += BLOCK - position % BLOCK
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
            pending += data[position + HEADER : position + HEADER + length]
            position += HEADER + length
            if kind in (1, 4):  # a full record, or a fragmented one's last piece
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    r = record.run
                    config = {u.key: u.value_json for u in r.config.update}
                    run |= {"id": r.run_id, "project": r.project, "name": r.display_name, "tags": list(r.tags)}
                    run["config"] = config
                elif record.WhichOneof("record_type") == "alert":
                    run.setdefault("alerts", []).append((record.alert.title, record.alert.text))
                elif record.WhichOneof("record_type") == "history":
                    items = {"/".join(i.nested_key) or i.key: float(i.value_json) for i in record.history.item}
                    run["history"][record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        runs.append(run)
    return runs


def test_a_runs_rows_and_config_go_to_a_wandb_run_and_a_stopped_runs_resume_continues_it(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "stopped" / "run"
    out.parent.mkdir()
    steps = ["train.max_steps=60", "train.save_every=0", "monitor.kl_nats_per_token=1e-6"]  # a KL warning fires
    process = start_cli(tiny_model_dir, out, *steps, *W_AND_B)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count('"loss"') >= 2, process)  # fmt: skip
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped_at = int(latest_checkpoint(out).name.split("-")[1])
    train(tiny_config(tiny_model_dir, out, *RUN, *steps, *W_AND_B, "train.resume=auto"))

    first, resumed = offline_runs(out)
    run_id = (out / WANDB_RUN_ID).read_text().strip()
    assert first["id"] == resumed["id"] == run_id, "the resume logs to the same W&B run"
    assert first["project"] == "dpo-lora-tests" and first["name"] == "run" and first["tags"] == ["ci", "tiny"]
    assert json.loads(first["config"]["dpo"])["beta"] == 0.1 and json.loads(first["config"]["train"])["max_steps"] == 60  # fmt: skip
    rows = train_rows(out)
    assert set(first["history"]) | set(resumed["history"]) == set(rows) == set(range(1, 61))
    assert max(first["history"]) == stopped_at and min(resumed["history"]) == stopped_at + 1
    alerts = first.get("alerts", []) + resumed.get("alerts", [])
    assert alerts and all(title == "dpo-lora: kl" and "KL growth at step" in text for title, text in alerts), alerts
    for step, row in rows.items():
        logged = (resumed if step > stopped_at else first)["history"][step]
        assert logged["loss"] == pytest.approx(row["loss"]) and logged["rewards/accuracies"] == pytest.approx(row["rewards/accuracies"])  # fmt: skip


def test_without_the_wandb_package_the_run_stops_in_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match=r"^wandb.project is set, but wandb is not installed: pip install wandb$"):
        MetricsWriter(tmp_path, WandbConfig(project="p"), {})
    assert not (tmp_path / WANDB_RUN_ID).exists()
    MetricsWriter(tmp_path, WandbConfig(), {}).close()  # no project: no W&B, no import


def test_online_without_a_key_stops_in_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match=r"^wandb.project: W&B did not start \(.*\); wandb.mode=offline logs without it$"):  # fmt: skip
        MetricsWriter(tmp_path, WandbConfig(project="p"), {})
