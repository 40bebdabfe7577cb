"""The local backend: each run is a process group on this machine, led by the supervisor.

A backend starts a job's run, tells whether it still runs, asks it to stop (the trainer saves a
checkpoint and exits) and kills it; the scheduler does the rest the same way for every backend.
A run's handle is (pid, start time): a pid reused by another process is never taken for the run.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
from pathlib import Path

from dpo_lora.serve import processes


def train_arguments(directory: Path) -> list[str]:
    """`dpo-lora train` on the job's config: resume from its newest complete checkpoint, else start
    afresh over whatever an attempt that died before its first checkpoint left."""
    return [str(directory / "config.yaml"), "train.resume=auto", "overwrite=true"]


def job_environment(directory: Path) -> dict[str, str]:
    """Variables every run of a job gets: its tokenize and reference caches live in its own folder,
    so a job reads and writes nothing of the server's user's caches, and deleting it cleans them."""
    cache = Path(directory) / "cache"
    return {"DPO_LORA_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets")}


class LocalBackend:
    name = "local"
    interval_s = 0.5  # between scheduler ticks

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu

    def start(self, job_id: str, directory: Path, devices: list[str], attempt: int) -> tuple[int, int | None]:
        train = ["dpo_lora", "train", *train_arguments(directory)]
        if self.on_gpu or len(devices) > 1:
            # DeepSpeed's per-node launcher (what `deepspeed --include localhost:...` runs): it gives
            # each rank one SIGTERM when it gets one. Its `deepspeed` front end would not pass the
            # signal on for a single node, leaving the ranks running.
            ids = [int(d) for d in devices] if self.on_gpu else list(range(len(devices)))
            world = base64.urlsafe_b64encode(json.dumps({"localhost": ids}).encode()).decode()
            command = [
                sys.executable,
                "-u",
                "-m",
                "deepspeed.launcher.launch",
                f"--world_info={world}",
                "--master_addr=127.0.0.1",
                f"--master_port={processes.free_port()}",
                "--module",
                *train,
            ]
        else:
            command = [sys.executable, "-m", *train]
        return processes.start(command, directory, attempt, env=job_environment(directory))

    def refresh(self, handles: list[int]) -> None:
        """Before a tick's is_alive calls (a backend that asks a controller asks once here)."""

    def reaches(self, runner: str) -> bool:
        """Whether this backend can watch the runs of the server named `runner`: its processes are
        on that server's host, so only a server on the same host can."""
        return runner.split(":", 1)[0] == socket.gethostname()

    def is_alive(self, handle: int, started: int | None) -> bool:
        return processes.is_alive(handle, started)

    def state(self, handle: int) -> str | None:
        """A backend's own word for the run's state, when it has one worth reporting."""
        return None

    def request_stop(self, handle: int, directory: Path) -> None:
        processes.request_stop(handle)  # the supervisor forwards it once to the run

    def kill(self, handle: int) -> None:
        processes.kill_group(handle)
