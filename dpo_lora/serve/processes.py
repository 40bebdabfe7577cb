"""Starting a run's process group and knowing it again after a server restart.

A process is identified by its pid *and* its start time (Linux /proc), so a pid reused by an
unrelated process after a reboot or a long outage is never mistaken for the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

LOG_FILE = "run.log"  # in a job's folder: the output of every attempt of its run, appended
_children: dict[int, subprocess.Popen] = {}  # processes this server started (reaped here)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces


def is_alive(pid: int, started: int | None) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    current = start_time(pid)
    if current is None or (started is not None and current != started):
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie has finished


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], directory: Path, attempt: int, env: dict | None = None) -> tuple[int, int | None]:
    """Start `command` under the supervisor in a new session; returns (pid, start time)."""
    exit_file, log_file = exit_path(directory, attempt), directory / LOG_FILE
    with open(log_file, "ab") as log:
        log.write(f"\n=== attempt {attempt}: {' '.join(command)}\n".encode())
    child = subprocess.Popen(
        [sys.executable, "-m", "dpo_lora.serve.supervise", str(exit_file), str(log_file), "--", *command],
        cwd=directory,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _children[child.pid] = child
    return child.pid, start_time(child.pid)


def started_record(directory: Path, attempt: int) -> tuple[int, int | None] | None:
    """(pid, start time) the attempt's supervisor wrote when it started, or None."""
    try:
        record = json.loads(Path(f"{exit_path(directory, attempt)}.started").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record["pid"], record["start_time"]


def exit_path(directory: Path, attempt: int) -> Path:
    return Path(directory) / f"exit-{attempt}.json"


def returncode(directory: Path, attempt: int) -> int | None:
    """The recorded exit status of an attempt; None when its supervisor died without recording one."""
    try:
        return json.loads(exit_path(directory, attempt).read_text())["returncode"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def request_stop(pid: int) -> None:
    """SIGTERM to the supervisor, which forwards it once to the run."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def kill_group(pid: int) -> None:
    """SIGKILL to the whole group (the supervisor leads it): every rank and the launcher."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
