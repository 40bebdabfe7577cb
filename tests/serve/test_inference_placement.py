"""Where inference runs: never on a device a job holds, and a lent GPU goes back to the jobs."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dpo_lora.core.errors import UserError
from dpo_lora.serve.engine import EngineError
from dpo_lora.serve.inference import Inference, parse_devices
from dpo_lora.serve.scheduler import Scheduler
from dpo_lora.serve.store import Job, Store

from .test_store import queued_job


class GpuBackend:
    """Starts nothing; records which devices each job got."""

    on_gpu, interval_s = True, 0.1

    def __init__(self) -> None:
        self.started: dict[str, list[str]] = {}

    def start(self, job_id, directory, devices, attempt):
        self.started[job_id] = devices
        return 4000 + len(self.started), None

    def refresh(self, handles):
        pass

    def is_alive(self, handle, started):
        return True


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.dispose()


def test_a_lent_gpu_is_kept_from_jobs_until_it_is_given_back(store, tmp_path):
    backend = GpuBackend()
    scheduler = Scheduler(store, ["0", "1"], backend, runner="me")
    queued_job(store, "holds-0", tmp_path, status="running", devices=["0"], runner="me", attempt=1, pid=1)
    assert scheduler.lend() == "1", "the GPU no job holds"
    assert scheduler.lend() is None, "none left: the job holds 0, inference 1"
    queued_job(store, "wants-1", tmp_path, queue_seq=1, devices_wanted=1)
    scheduler._dispatch()
    assert "wants-1" not in backend.started, "the lent GPU is not free for jobs"
    scheduler.give_back("1")
    scheduler._dispatch()
    assert backend.started["wants-1"] == ["1"]
    with store.session() as s:
        assert s.get(Job, "wants-1").devices == ["1"]


def test_auto_placement_borrows_a_free_gpu_or_answers_503(store):
    scheduler = Scheduler(store, ["0"], GpuBackend(), runner="me")
    inference = Inference(None, scheduler)
    assert inference._place() == "0"
    with pytest.raises(EngineError, match="every GPU is held") as caught:
        inference._place()
    assert caught.value.status == 503
    scheduler.give_back("0")
    assert inference._place() == "0"
    assert Inference(None, None)._place() == "cpu", "no GPU server: the CPU"
    assert Inference(["2", "3"], scheduler)._place() in ("2", "3")


def test_inference_devices_are_auto_cpu_or_the_servers_gpus():
    assert parse_devices("auto", ["0", "1"]) is None
    assert parse_devices("cpu", None) == ["cpu"]
    assert parse_devices("1", ["0", "1"]) == ["1"]
    with pytest.raises(UserError, match="--inference-devices 2: expected auto, cpu or GPU indices among 0,1"):
        parse_devices("2", ["0", "1"])
    with pytest.raises(UserError, match="no GPU here"):
        parse_devices("0", None)


def test_projects_take_turns_and_each_projects_jobs_keep_their_order(store, tmp_path):
    """One device: A queued three jobs before B queued two. After A's first, B's first (B has not
    had a turn), then A's, B's and A's: turns, each project in its own order. And while a project
    holds devices, one that holds none goes first."""
    backend = GpuBackend()
    scheduler = Scheduler(store, ["0"], backend, runner="me")
    jobs = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b")]
    for seq, (job_id, project) in enumerate(jobs, start=1):
        queued_job(store, job_id, tmp_path, queue_seq=seq, devices_wanted=1, project=project)
    order = []
    for _ in jobs:
        scheduler._dispatch()
        (started,) = set(backend.started) - set(order)
        order.append(started)
        with store.session() as s:  # it ends: its device is free again
            job = s.get(Job, started)
            job.devices, job.status = None, "succeeded"
    assert order == ["a1", "b1", "a2", "b2", "a3"], order
    two = Scheduler(store, ["0", "1"], GpuBackend(), runner="other")
    queued_job(store, "c-holds", tmp_path, status="running", devices=["0"], runner="other", project="c", attempt=1, pid=9)  # fmt: skip
    queued_job(store, "c2", tmp_path, queue_seq=10, devices_wanted=1, project="c")
    queued_job(store, "d1", tmp_path, queue_seq=11, devices_wanted=1, project="d")
    two._dispatch()
    assert list(two.backend.started) == ["d1"], "c holds a device, d none: d's job goes first"


def test_a_projects_weight_is_its_share_of_the_devices(store, tmp_path):
    """Four devices, A of weight 3 and B of weight 1, each with four jobs queued (A's first): A
    takes three, B one. Equal weights would give two each. The weights are read at every dispatch
    (SIGHUP may change them)."""
    for weights, (a, b) in (({"a": 3.0}, (3, 1)), ({}, (2, 2))):
        backend = GpuBackend()
        scheduler = Scheduler(store, ["0", "1", "2", "3"], backend, runner="me", weights=lambda w=weights: w)
        case = "w" if weights else "e"
        for seq, job_id in enumerate([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)], start=1):
            queued_job(store, case + job_id, tmp_path, queue_seq=seq, devices_wanted=1, project=job_id[0])
        scheduler._dispatch()
        started = sorted(job_id[1:] for job_id in backend.started)
        assert started == [f"a{i}" for i in range(a)] + [f"b{i}" for i in range(b)], weights
        with store.session() as s:  # a fresh queue for the next case
            for job in s.scalars(select(Job)):
                job.devices, job.status = None, "cancelled"


def test_a_project_at_its_device_cap_waits_while_others_start(store, tmp_path):
    """--project-devices 1 on three devices: A's second job waits while A's first runs, though a
    device is free; B's starts meanwhile."""
    backend = GpuBackend()
    scheduler = Scheduler(store, ["0", "1", "2"], backend, runner="me", project_devices=1)
    for seq, (job_id, project) in enumerate([("a1", "a"), ("a2", "a"), ("b1", "b")], start=1):
        queued_job(store, job_id, tmp_path, queue_seq=seq, devices_wanted=1, project=project)
    scheduler._dispatch()
    assert sorted(backend.started) == ["a1", "b1"], "a2 waits: a holds its one device"
    with store.session() as s:
        job = s.get(Job, "a1")
        job.devices, job.status = None, "succeeded"
    scheduler._dispatch()
    assert sorted(backend.started) == ["a1", "a2", "b1"]


def test_a_silent_servers_running_job_is_adopted_once_on_sqlite_too(store, tmp_path):
    """Runner "dead" last beat an hour ago with a job running: the next scheduler on the store that
    reaches it takes the job over (runner, event), removes the dead row, and a second adopts nothing."""
    import time

    from dpo_lora.serve import failover
    from dpo_lora.serve.store import Event, Runner

    with store.session() as s:
        s.add(Runner(name="dead", heartbeat_at=time.time() - 3600))
    queued_job(store, "orphan", tmp_path, status="running", devices=["0"], runner="dead", attempt=1, pid=9)

    class Reaching(GpuBackend):
        def reaches(self, runner):
            return True

    adopter = Scheduler(store, ["1"], Reaching(), runner="alive", adopt_after_s=failover.MIN_ADOPT_AFTER_S)
    adopter._adopt_silent()
    Scheduler(store, ["2"], Reaching(), runner="late", adopt_after_s=failover.MIN_ADOPT_AFTER_S)._adopt_silent()
    with store.session() as s:
        assert s.get(Job, "orphan").runner == "alive" and s.get(Runner, "dead") is None
        messages = [e.message for e in s.scalars(select(Event).where(Event.job_id == "orphan"))]
    assert messages == ["Server dead fell silent for 10 s; alive adopted the job"]
