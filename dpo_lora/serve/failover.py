"""Servers sharing one store watch over each other: a server that stops showing it is alive has
its running jobs and exports adopted by one that can reach them.

Each scheduler writes a heartbeat to the store every BEAT_S seconds (`runners`). With
`--adopt-after SECONDS`, a server that finds another's heartbeat older than that takes over its
running jobs and exports (SLURM's from anywhere on the cluster; local processes only on their own
host), and from then on watches them as its own: a job whose process is alive runs on, one whose
process is gone resumes from its newest checkpoint. The dead server's row goes with it, so one
server adopts, once; started again, that server finds nothing of its own and carries on.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from dpo_lora.serve.store import Export, Job, Runner, Store

BEAT_S = 2.0  # between a server's heartbeats (and its looks at the others')
MIN_ADOPT_AFTER_S = 10.0  # five heartbeats: shorter would take a slow tick for a dead server


def beat(store: Store, runner: str) -> None:
    with store.session() as s:
        s.merge(Runner(name=runner, heartbeat_at=time.time()))


def silent(s, runner: str, after_s: float) -> list[Runner]:
    """The other servers silent for `after_s` seconds, their rows locked: one adopter at a time."""
    query = select(Runner).where(Runner.name != runner, Runner.heartbeat_at < time.time() - after_s)
    return list(s.scalars(query.with_for_update()))


def adopt(store: Store, s, dead: Runner, runner: str, after_s: float) -> list[Job]:
    """Make `runner` the runner of `dead`'s running jobs and exports whose folders it can see; the
    jobs. `dead`'s row goes: it is adopted once."""
    adopted = []
    running = select(Job).where(Job.runner == dead.name, Job.devices.is_not(None)).with_for_update()
    for job in list(s.scalars(running)):  # read whole before the events' flushes
        if Path(job.directory).is_dir():  # else its folder is on a filesystem this server does not see
            job.runner = runner
            store.add_event(s, job.id, f"Server {dead.name} fell silent for {after_s:.0f} s; {runner} adopted the job")
            adopted.append(job)
    for export in list(s.scalars(select(Export).where(Export.runner == dead.name, Export.status == "running"))):
        if Path(export.directory).is_dir():
            export.runner = runner
    s.delete(dead)
    return adopted
