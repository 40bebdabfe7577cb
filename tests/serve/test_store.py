"""The job store on SQLite and on a real PostgreSQL server: atomic claims, row-locked
read-modify-writes, 64-bit columns, and each server recovering only its own runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from dpo_lora.serve import processes
from dpo_lora.serve.local import LocalBackend
from dpo_lora.serve.scheduler import Scheduler
from dpo_lora.serve.store import Export, Job, Store


def queued_job(store: Store, job_id: str, directory, **fields) -> None:
    fields = {"status": "queued", **fields}
    with store.session() as s:
        s.add(Job(id=job_id, created_at=1, model="m", training_file="f", hyperparameters={}, seed=1, extra={},
                  directory=str(directory), **fields))  # fmt: skip


def together(functions) -> list:
    """Run the functions in threads released at the same moment; their results in order."""
    barrier, results = threading.Barrier(len(functions)), [None] * len(functions)

    def run(i, function):
        barrier.wait()
        results[i] = function()

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_one_of_many_servers_claims_a_queued_job(store_url, tmp_path):
    # Separate engines (separate connections, as servers have), started together on an empty database.
    servers = together([lambda: Store(store_url) for _ in range(6)])
    try:
        for round_ in range(5):
            queued_job(servers[0], f"job-{round_}", tmp_path)
            job_id = f"job-{round_}"
            won = together([lambda i=i, s=s, job_id=job_id: s.claim(job_id, ["cpu0"], 1, f"server-{i}")
                            for i, s in enumerate(servers)])  # fmt: skip
            assert won.count(True) == 1, won
            with servers[0].session() as s:
                job = s.get(Job, f"job-{round_}")
                assert (job.status, job.runner) == ("running", f"server-{won.index(True)}")
    finally:
        for store in servers:
            store.dispose()


def test_a_cancel_and_a_claim_never_interleave(store_url, tmp_path):
    """Cancel reads the job, then writes it; the claim writes between would be lost without the
    row lock. Whatever the order, a cancelled job is never left running without a stop request."""
    cancelling, claiming = Store(store_url), Store(store_url)

    def cancel(job_id: str) -> None:
        with cancelling.session() as s:
            job = cancelling.for_update(s, Job, job_id)
            threading.Event().wait(0.05)  # widen the window a lost update needs
            if job.devices is not None:
                job.stop_request = "cancel"
            job.status = "cancelled"

    try:
        for round_ in range(6):
            job_id = f"job-{round_}"
            queued_job(cancelling, job_id, tmp_path)
            claimed, _ = together([lambda j=job_id: claiming.claim(j, ["cpu0"], 1, "me"), lambda j=job_id: cancel(j)])
            with claiming.session() as s:
                job = s.get(Job, job_id)
                assert job.status == "cancelled"
                if claimed:  # the claim came first: the scheduler must be told to stop the run
                    assert (job.devices, job.stop_request) == (["cpu0"], "cancel")
                else:
                    assert (job.devices, job.stop_request) == (None, None)
    finally:
        cancelling.dispose()
        claiming.dispose()


def test_large_counts_and_process_start_times_round_trip(store_url, tmp_path):
    """Tokens trained, byte offsets and /proc start ticks pass 2**31 on long runs and long uptimes."""
    store = Store(store_url)
    try:
        queued_job(store, "big", tmp_path, trained_tokens=2**40, metrics_offset=2**33, pid_start=2**41)
        with store.session() as s:
            job = s.get(Job, "big")
            assert (job.trained_tokens, job.metrics_offset, job.pid_start) == (2**40, 2**33, 2**41)
    finally:
        store.dispose()


def test_a_restarted_server_recovers_only_its_own_claims(store_url, tmp_path):
    """The server died between claiming and storing the pid: the supervisor's own start record
    decides (adopt the process it names), without one the job is queued again; jobs and exports
    another server claimed are left to it."""
    store = Store(store_url)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, runner in (("started", "me"), ("never-started", "me"), ("another-servers", "other")):
            (tmp_path / name).mkdir()
            queued_job(store, name, tmp_path / name, status="running", devices=["cpu0"], attempt=1, runner=runner)
        with store.session() as s:
            for name, runner in (("export-mine", "me"), ("export-theirs", "other")):
                (tmp_path / name).mkdir()
                s.add(Export(id=name, job_id="started", created_at=1, status="running", options={}, attempt=1,
                             directory=str(tmp_path / name), runner=runner))  # fmt: skip
        record = {"pid": sleeper.pid, "start_time": processes.start_time(sleeper.pid)}
        (tmp_path / "started" / "exit-1.json.started").write_text(json.dumps(record))
        Scheduler(store, ["cpu0"], LocalBackend(on_gpu=False), runner="me")._announce_recovery()
        with store.session() as s:
            adopted, requeued = s.get(Job, "started"), s.get(Job, "never-started")
            assert (adopted.status, adopted.pid, adopted.devices) == ("running", sleeper.pid, ["cpu0"])
            assert (requeued.status, requeued.pid, requeued.devices) == ("queued", None, None)
            theirs = s.get(Job, "another-servers")
            assert (theirs.status, theirs.devices) == ("running", ["cpu0"]), "another server's claim is its own"
            assert s.get(Export, "export-mine").status == "queued"
            assert s.get(Export, "export-theirs").status == "running"
    finally:
        sleeper.kill()
        store.dispose()


def test_a_store_an_older_dpo_lora_made_gains_the_new_columns_and_keeps_its_jobs(store_url, tmp_path):
    """A database whose jobs table lacks columns added since (here three, of three kinds: a number, a
    text and a JSON list): opening it adds them, each filled with its default in the old rows."""
    from sqlalchemy import MetaData, create_engine, inspect

    from dpo_lora.serve.store import Base

    older = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(older)
    jobs = older.tables["jobs"]
    for name in ("last_step", "metrics_last_line", "result_files"):
        jobs._columns.remove(jobs.c[name])
    engine = create_engine(store_url)
    with engine.begin() as connection:
        older.create_all(connection)
        row = dict(id="old", created_at=1, created_ns=1, model="m", training_file="f", hyperparameters={}, seed=1,
                   extra={}, status="succeeded", directory=str(tmp_path), devices_wanted=1, queue_seq=0, attempt=0,
                   metrics_offset=0)  # fmt: skip
        connection.execute(jobs.insert().values(**row))
    engine.dispose()

    store = Store(store_url)
    try:
        columns = {c["name"] for c in inspect(store.engine).get_columns("jobs")}
        assert {"last_step", "metrics_last_line", "result_files"} <= columns
        with store.session() as s:
            job = s.get(Job, "old")
            assert (job.last_step, job.metrics_last_line, job.result_files, job.status) == (0, "", [], "succeeded")
        queued_job(store, "new", tmp_path)  # and the new version writes as usual
        with store.session() as s:
            assert s.get(Job, "new").last_step == 0
    finally:
        store.dispose()
    Store(store_url).dispose()  # opening it again finds nothing to add
