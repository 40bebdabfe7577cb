"""The leader of a run's process group: starts the run, waits for it, records its exit status.

    python -m dpo_lora.serve.supervise EXIT_FILE LOG_FILE -- COMMAND...

It outlives the server (its own session), so a restarted server can tell a run that finished
(EXIT_FILE holds {"returncode": N}) from one that died with its group (no EXIT_FILE). Before it
writes EXIT_FILE it kills whatever of the group is left (a rank orphaned by its launcher), so a
recorded exit means nothing of the run still writes to its folder. A SIGTERM
is forwarded once to the run (the trainer checkpoints and exits; DeepSpeed's launcher forwards it
to every rank), never delivered twice: a second SIGTERM would make the trainer exit at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from dpo_lora.serve.processes import start_time


def main(argv: list[str]) -> int:
    exit_file, log_file, separator, *command = argv
    assert separator == "--" and command, __doc__
    _write_json(f"{exit_file}.started", {"pid": os.getpid(), "start_time": _start_time()})
    with open(log_file, "ab", buffering=0) as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        forwarded = False

        def forward(signum, _frame) -> None:
            nonlocal forwarded
            if not forwarded:
                forwarded = True
                child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        returncode = child.wait()
    _kill_rest_of_group()
    _write_json(exit_file, {"returncode": returncode})
    return 0


def _write_json(path: str, value: dict) -> None:
    """Atomically: a reader sees the whole file or none."""
    with open(f"{path}.tmp", "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(f"{path}.tmp", path)


def _start_time() -> int:

    return start_time(os.getpid())


def _kill_rest_of_group() -> None:
    me, group = os.getpid(), os.getpgrp()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
