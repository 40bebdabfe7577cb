"""Preemption for fair share (--preempt-after): which running job a starved project's queued job stops,
when none may, and what the stopped job becomes; then the whole path on the tiny Llama through the
real client."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from dpo_lora.serve.scheduler import Scheduler
from dpo_lora.serve.status import JobStatus, StopRequest
from dpo_lora.serve.store import Job, Store

from .conftest import all_events, wait_for_status
from .test_scheduler import wait_for_event
from .test_store import queued_job

LONG_AGO = time.time_ns() - 3_600 * 10**9
PIDS = itertools.count(100)  # each running job its own process id


class Backend:
    """Starts nothing; records stop requests; a process is alive until `ended` names it."""

    on_gpu, interval_s = True, 0.1

    def __init__(self) -> None:
        self.started: dict[str, list[str]] = {}
        self.stopped: list[int] = []
        self.ended: set[int] = set()

    def start(self, job_id, directory, devices, attempt):
        self.started[job_id] = devices
        return 5000 + len(self.started), None

    def refresh(self, handles):
        pass

    def is_alive(self, handle, started):
        return handle not in self.ended

    def state(self, handle):
        return None

    def request_stop(self, handle, directory):
        self.stopped.append(handle)

    def kill(self, handle):
        self.ended.add(handle)


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.dispose()


def running(store, job_id, tmp_path, project, devices, started_ns=LONG_AGO, pid=None):
    folder = tmp_path / job_id
    folder.mkdir()
    queued_job(store, job_id, folder, status="running", project=project, devices=devices, runner="me", attempt=1,
               pid=pid or next(PIDS), started_ns=started_ns)  # fmt: skip


def waiting(store, job_id, tmp_path, project, queued_ns=LONG_AGO, seq=1, wanted=1):
    folder = tmp_path / job_id
    folder.mkdir()
    queued_job(store, job_id, folder, project=project, queue_seq=seq, queued_ns=queued_ns, devices_wanted=wanted)


def stop_requests(store) -> dict[str, str]:
    with store.session() as s:
        return {job.id: job.stop_request.value for job in s.query(Job) if job.stop_request is not None}


def test_the_starved_projects_job_stops_the_over_share_projects_newest_job_once(store, tmp_path):
    """A holds both devices, B waits: A's job that started last is asked to stop, once; a second tick
    asks nothing more while that stop is in flight."""
    running(store, "a-old", tmp_path, "a", ["0"], started_ns=LONG_AGO)
    running(store, "a-new", tmp_path, "a", ["1"], started_ns=LONG_AGO + 10**9)
    waiting(store, "b-1", tmp_path, "b")
    backend = Backend()
    scheduler = Scheduler(store, ["0", "1"], backend, runner="me", preempt_after_s=60)
    scheduler._preempt()
    assert stop_requests(store) == {"a-new": "preempt"}
    scheduler._preempt()
    assert stop_requests(store) == {"a-new": "preempt"}
    scheduler._watch()  # carries the request out: SIGTERM, as a pause's
    with store.session() as s:
        assert backend.stopped == [s.get(Job, "a-new").pid]
    messages = [e.message for e in all_store_events(store, "a-new")]
    assert "Preempted for job b-1 of a project below its share: the job checkpoints at its next step" in messages
    assert "Job a-new of a project over its share stops for this one" in [
        e.message for e in all_store_events(store, "b-1")
    ]


def all_store_events(store, job_id):
    from dpo_lora.serve.store import Event

    with store.session() as s:
        return list(s.query(Event).filter(Event.job_id == job_id).order_by(Event.seq))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("fair already", {}),  # A and B hold one each: B's second job would leave A the starved one
        ("one device", {}),  # A holds the only one: a swap would only make A the starved project
        ("waited too little", {}),
        ("victim ran too little", {}),
        ("weighted over share", {"a-3": "preempt"}),  # weight 3 holding 4 of 4: B's first job takes one
        ("weighted at share", {}),  # weight 3 holding 3 of 4, B 1: B's second job waits
        ("other server's job", {}),  # only the server that runs a job can stop it
    ],
)
def test_no_job_is_stopped_unless_the_swap_makes_the_shares_fairer(store, tmp_path, case, expected):
    weights, devices = {}, ["0", "1"]
    if case == "one device":
        devices = ["0"]
        running(store, "a-1", tmp_path, "a", ["0"])
        waiting(store, "b-1", tmp_path, "b")
    elif case == "fair already":
        running(store, "a-1", tmp_path, "a", ["0"])
        running(store, "b-1", tmp_path, "b", ["1"])
        waiting(store, "b-2", tmp_path, "b")
    elif case in ("waited too little", "victim ran too little", "other server's job"):
        running(store, "a-1", tmp_path, "a", ["0"], started_ns=time.time_ns() if case == "victim ran too little" else LONG_AGO)  # fmt: skip
        running(store, "a-2", tmp_path, "a", ["1"], started_ns=time.time_ns() if case == "victim ran too little" else LONG_AGO)  # fmt: skip
        waiting(store, "b-1", tmp_path, "b", queued_ns=time.time_ns() if case == "waited too little" else LONG_AGO)
        if case == "other server's job":
            with store.session() as s:
                for job in s.query(Job):
                    job.runner = "another" if job.status == JobStatus.RUNNING else None
    else:
        weights, devices = {"a": 3.0}, ["0", "1", "2", "3"]
        held = 4 if case == "weighted over share" else 3
        for i in range(held):
            running(store, f"a-{i}", tmp_path, "a", [str(i)], started_ns=LONG_AGO + i)
        if held == 3:
            running(store, "b-0", tmp_path, "b", ["3"])
        waiting(store, "b-1", tmp_path, "b")
    Scheduler(store, devices, Backend(), runner="me", weights=lambda: weights, preempt_after_s=60)._preempt()
    assert stop_requests(store) == expected


def test_a_preempted_job_queues_again_in_its_place_and_a_pause_overrides_the_preemption(store, tmp_path):
    running(store, "a-0", tmp_path, "a", ["1"])
    running(store, "a-1", tmp_path, "a", ["0"], started_ns=LONG_AGO + 1)
    waiting(store, "a-2", tmp_path, "a", seq=5)
    waiting(store, "b-1", tmp_path, "b", seq=6)
    with store.session() as s:
        s.get(Job, "a-1").queue_seq = 2  # where it was when it first queued
    backend = Backend()
    scheduler = Scheduler(store, ["0", "1"], backend, runner="me", preempt_after_s=60)
    scheduler._preempt()
    assert stop_requests(store) == {"a-1": "preempt"}
    with store.session() as s:
        backend.ended.add(s.get(Job, "a-1").pid)  # it checkpointed and exited
    scheduler._watch()
    with store.session() as s:
        job = s.get(Job, "a-1")
        assert (job.status, job.devices, job.stop_request, job.queue_seq) == (JobStatus.QUEUED, None, None, 2)
    assert "The job was preempted and is queued again; it resumes from the start (no checkpoint yet)" in [
        e.message for e in all_store_events(store, "a-1")
    ]
    scheduler._dispatch()  # B's job first (its project holds nothing), then A's preempted one before A's other
    assert list(backend.started) == ["b-1"]

    from dpo_lora.serve import lifecycle

    with store.session() as s:
        job = s.get(Job, "b-1")
        job.stop_request = StopRequest.PREEMPT
        lifecycle.pause(store, s, job)
        assert job.stop_request == StopRequest.PAUSE


KEYS = {"team-a": "a-key-0123456789abcdef", "team-b": "b-key-0123456789abcdef"}


def test_a_starved_projects_job_preempts_a_running_one_which_resumes_and_finishes(servers, tiny_setup, tmp_path):
    """Two CPU slots, --preempt-after 2: A's two long jobs hold both; B's job, queued behind them, stops
    the newer at a checkpoint after 2 s, runs and finishes; the stopped job then resumes from its
    checkpoint and finishes, each of its steps reported once. (On one slot nothing is preempted: the
    swap would only starve A.)"""
    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = servers(models, config, "--api-keys", str(keys), "--preempt-after", "2", "--cpu-slots", "2")
    a, b = server.client(KEYS["team-a"]), server.client(KEYS["team-b"])
    file_a = a.files.create(file=train.open("rb"), purpose="fine-tune").id
    file_b = b.files.create(file=train.open("rb"), purpose="fine-tune").id
    steps = 40
    longs = [
        a.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=file_a,
            method={"type": "dpo"},
            extra_body={"dpo_lora": {"train": {"max_steps": steps, "save_every": 2}}},
        )  # fmt: skip
        for _ in range(2)
    ]
    for job in longs:
        wait_for_event(a, job.id, "Checkpoint created at step 2")
    short = b.fine_tuning.jobs.create(model="tiny-llama", training_file=file_b, method={"type": "dpo"},
                                      extra_body={"dpo_lora": {"train.max_steps": 2}})  # fmt: skip
    short = wait_for_status(b, short.id, ("succeeded",))
    (short_started,) = [
        e.created_at for e in all_events(b, short.id) if e.message.startswith("Fine-tuning job started")
    ]
    preempted = []
    for job in longs:
        job = wait_for_status(a, job.id, ("succeeded",))
        events = all_events(a, job.id)
        if any(e.message.startswith(f"Preempted for job {short.id}") for e in events):
            preempted.append(job.id)
            requeued = [e for e in events if e.message.startswith("The job was preempted and is queued again")]
            assert len(requeued) == 1 and "resumes from step" in requeued[0].message
            starts = [e.created_at for e in events if e.message.startswith("Fine-tuning job started")]
            assert len(starts) == 2 and starts[0] <= short_started <= starts[1]  # B's job took its device
        reported = [e.data["step"] for e in events if e.type == "metrics" and "loss" in e.data]
        assert reported == list(range(1, steps + 1))  # each step once, across the preemption
    assert preempted == [longs[1].id]  # the newer of A's two
