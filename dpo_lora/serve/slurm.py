"""The SLURM backend: each attempt of a job is one SLURM job, submitted with `sbatch --parsable`.

The job's script is rendered from the shipped launch/slurm.sbatch into the job's folder, which must
be on a filesystem the nodes share (--state-dir): the ranks write their metrics, checkpoints and
adapter there, and the scheduler reads them as it does for local runs. The script records the
run's exit status in the attempt's exit file (as the local supervisor does), so a finished job is
told apart from one that died with its node, whether or not SLURM still remembers it (no sacct
needed). A run's handle is its SLURM job id.

Stopping (pause, cancel): first a marker file that keeps the script from requeueing, then SIGTERM
to every rank (`scancel --signal=TERM`): the trainers checkpoint and exit. After the grace period:
`scancel`. A job that reaches its time limit is requeued by the script itself and keeps its id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from dpo_lora.core.errors import UserError
from dpo_lora.serve import processes
from dpo_lora.serve.local import job_environment, train_arguments

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"
# SLURM states in which the job will not run again (squeue --states=all still lists them a while).
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "SPECIAL_EXIT",
    "REVOKED",
}
NO_REQUEUE = "slurm-no-requeue"  # in the job folder: the script must not requeue (a stop was asked for)


# sbatch's words for a controller that is down or busy: the job is submitted again later.
TRANSIENT = ("Unable to contact slurm controller", "Socket timed out", "temporarily unable", "Slurm backup controller")


class SlurmError(OSError):
    """A SLURM command failed; its message is SLURM's. `transient`: the controller is down or
    busy (try again later), not a refusal of this job."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.transient = any(text.lower() in message.lower() for text in TRANSIENT)


def render(
    template: str, job_id: str, directory: Path, ranks: int, gpus_per_rank: int, cpus_per_rank: int, exit_file: Path
) -> str:
    """The shipped script with its #SBATCH defaults replaced by this job's, and the service's
    variables set: what ran can be read, and submitted again by hand, from the job's folder."""
    body = [line for line in template.splitlines() if not line.startswith("#SBATCH")]
    shebang, rest = body[0], body[1:]
    options = [
        f"--job-name=dpo-lora-{job_id}",
        f"--output={directory / processes.LOG_FILE}",
        "--open-mode=append",
        f"--chdir={directory}",
        f"--ntasks={ranks}",
        f"--cpus-per-task={cpus_per_rank}",
        "--signal=TERM@120",
        "--requeue",
    ]
    if gpus_per_rank:
        options.append(f"--gpus-per-task={gpus_per_rank}")
    variables = {
        **job_environment(directory),
        "PYTHON": sys.executable,
        "DPO_LORA_EXIT_FILE": str(exit_file),
        "DPO_LORA_NO_REQUEUE_FILE": str(directory / NO_REQUEUE),
    }
    header = [f"#SBATCH {option}" for option in options]
    header.append(f"# Rendered by dpo-lora serve for job {job_id} from its batch script template.")
    header += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join([shebang, *header, *rest]) + "\n"


class SlurmBackend:
    name = "SLURM"
    interval_s = 2.0  # between scheduler ticks: each asks one squeue about every running job

    def __init__(self, gpus_per_rank: int, cpus_per_rank: int, sbatch_options: list[str], template: Path = TEMPLATE):
        if not template.is_file():
            raise UserError(f"--slurm-script {template}: file not found")
        self.gpus_per_rank, self.cpus_per_rank = gpus_per_rank, cpus_per_rank
        self.sbatch_options, self.template = sbatch_options, template
        self._seen: dict[int, str | None] = {}  # job id -> its state at the last is_alive
        self._fresh: dict[int, str | None] = {}  # job id -> its state from this tick's refresh, until read

    def start(self, job_id: str, directory: Path, devices: list[str], attempt: int) -> tuple[int, None]:
        exit_file = processes.exit_path(directory, attempt)
        script = directory / "job.sbatch"
        script.write_text(
            render(
                self.template.read_text(),
                job_id,
                directory,
                len(devices),
                self.gpus_per_rank,
                self.cpus_per_rank,
                exit_file,
            )
        )
        (directory / NO_REQUEUE).unlink(missing_ok=True)
        with open(directory / processes.LOG_FILE, "ab") as log:
            log.write(f"\n=== attempt {attempt}: sbatch {script}\n".encode())
        output = _run(["sbatch", "--parsable", *self.sbatch_options, str(script), *train_arguments(directory)])
        slurm_job = int(output.strip().split(";")[0])  # "ID" or "ID;CLUSTER"
        # What the local supervisor writes when it starts: a server that dies right here finds it.
        Path(f"{exit_file}.started").write_text(json.dumps({"pid": slurm_job, "start_time": None}))
        return slurm_job, None

    def _states(self, handles: list[int]) -> dict[int, str | None]:
        """SLURM's state of each job (PENDING, RUNNING, ...; with the reason while pending), None for
        one SLURM no longer knows; one squeue call. A controller that does not answer raises: never
        taken as "gone"."""
        result = subprocess.run(
            ["squeue", "-h", "--states=all", "-o", "%i|%T|%r", "-j", ",".join(map(str, handles))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        states: dict[int, str | None] = dict.fromkeys(handles)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # squeue's answer for one forgotten job (a list leaves them out)
                return states
            raise SlurmError(f"squeue: {result.stderr.strip() or result.returncode}")
        for line in result.stdout.splitlines():
            job, state, reason = line.split("|", 2)
            if job.isdigit() and int(job) in states:
                states[int(job)] = f"{state} ({reason})" if state == "PENDING" and reason not in ("None", "") else state
        return states

    def refresh(self, handles: list[int]) -> None:
        """Ask squeue once about all the running jobs; each is_alive of this tick reads its answer."""
        self._fresh = self._states(handles) if handles else {}

    def reaches(self, runner: str) -> bool:
        """Any server on this cluster can watch another's SLURM jobs (their folders on the shared
        filesystem that --state-dir must be on)."""
        return True

    def is_alive(self, handle: int, started: int | None) -> bool:
        state = self._fresh.pop(handle) if handle in self._fresh else self._states([handle])[handle]
        self._seen[handle] = state
        return state is not None and state.split()[0] not in ENDED

    def state(self, handle: int) -> str | None:
        """The state the last is_alive saw (reported in the job's events when it changes)."""
        return self._seen.get(handle)

    def request_stop(self, handle: int, directory: Path) -> None:
        (directory / NO_REQUEUE).touch()
        state = self._states([handle])[handle] or ""
        if state.startswith("RUNNING"):
            subprocess.run(["scancel", "--signal=TERM", str(handle)], capture_output=True, timeout=60)
        else:  # nothing runs yet (or any more) that could save a checkpoint
            self.kill(handle)

    def kill(self, handle: int) -> None:
        subprocess.run(["scancel", str(handle)], capture_output=True, timeout=60)


def _run(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} not found: the SLURM backend needs SLURM's client commands") from None
    if result.returncode != 0:
        message = re.sub(r"\s+", " ", result.stderr.strip()).removeprefix(f"{command[0]}: ")
        message = message or f"exit status {result.returncode}"
        raise SlurmError(f"{command[0]}: {message}")
    return result.stdout


def environment_problem() -> str | None:
    """Why this machine cannot submit to SLURM, or None (checked when the server starts)."""
    for tool in ("sbatch", "squeue", "scancel"):
        if not any(os.access(Path(folder) / tool, os.X_OK) for folder in os.environ.get("PATH", "").split(":")):
            return f"--backend slurm: {tool} not found on PATH (install SLURM's client commands)"
    result = subprocess.run(["squeue", "-h", "-j", "1"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        return f"--backend slurm: squeue cannot reach the controller: {result.stderr.strip().splitlines()[0]}"
    return None
