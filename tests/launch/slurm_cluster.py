"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd (Debian's `slurm-wlm` and
`munge`) with a minimal slurm.conf for this host, its state and logs in a temp folder.

Process tracking by /proc parentage and no task plugin, so it needs no cgroups (containers, CI).
Clients find it through SLURM_CONF, which `start` returns with the rest of the environment to use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def unavailable_reason() -> str | None:
    """Why no cluster can start here, or None."""
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(tool)]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; Debian: slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def slurm_conf(folder: Path, host: str, cpus: int) -> str:
    return f"""\
ClusterName=dpolora-test
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=15
MinJobAge=600
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: Path) -> dict[str, str]:
    """Start the cluster; returns the environment SLURM's clients need to reach it."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_munged()
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = "\n".join(
        (folder / log).read_text()[-1500:] for log in ("slurmctld.log", "slurmd.log") if (folder / log).exists()
    )
    raise RuntimeError(f"the SLURM node did not become idle (sinfo: {state!r})\n{logs}")


def stop(folder: Path, env: dict[str, str]) -> None:
    """Stop slurmctld and slurmd (munged stays: other users of this machine may rely on it)."""
    subprocess.run(["scontrol", "shutdown"], env={**os.environ, **env}, capture_output=True)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        path = folder / pid_file
        deadline = time.monotonic() + 20
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def _start_munged() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # already running
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    Path("/var/log/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    shutil.chown("/var/log/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
