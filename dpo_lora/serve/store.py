"""The durable job store: files, uploads, jobs, events, checkpoints and idempotency keys.

Every state change is committed before it is acted on (a job is marked running before its process
starts; a stop is recorded before the signal is sent), so a server killed at any point finds on
restart what it was doing. SQLite in WAL mode is the embedded default; PostgreSQL
(`postgresql+psycopg://...`) runs the same code for several servers on one database:
- queued jobs and exports are claimed with a conditional UPDATE, so two servers never both start one;
- each claimed row names its runner (the server that started it), and a server watches, stops and
  recovers only its own runs;
- a read-modify-write locks its row first (`for_update`: SELECT ... FOR UPDATE on PostgreSQL; SQLite
  takes its write lock when each transaction begins), so a cancel never interleaves with a claim;
- a count against a project's quota and the insert it admits lock the project first (`lock_project`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dpo_lora.core.errors import UserError
from dpo_lora.serve.status import JobStatus, StopRequest


def _values(enum_class, length: int) -> Enum:
    """An enum column stored as its values' text (the columns' type before they were enums)."""
    return Enum(
        enum_class,
        native_enum=False,
        length=length,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    purpose: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(Integer)
    created_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)  # list order
    status: Mapped[str] = mapped_column(String(16))  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    project: Mapped[str] = mapped_column(String(64), default="default", index=True)  # its API key's
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # expires_after's


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[int] = mapped_column(Integer)
    created_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)  # list order
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hyperparameters: Mapped[dict] = mapped_column(JSON)  # resolved: batch_size, beta, lr multiplier, n_epochs
    seed: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    extra: Mapped[dict] = mapped_column(JSON)  # the request's `dpo_lora` knobs, as given
    job_metadata: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    status: Mapped[JobStatus] = mapped_column(_values(JobStatus, 24), index=True)
    error: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    directory: Mapped[str] = mapped_column(Text)  # config.yaml, data, run/, logs
    devices_wanted: Mapped[int] = mapped_column(Integer, default=1)
    queue_seq: Mapped[int] = mapped_column(Integer, default=0)  # FIFO position while queued
    # The running attempt: which devices it holds and which process is it (pid + start time, so a
    # reused pid is never taken for it). Null when nothing runs.
    devices: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    runner: Mapped[str | None] = mapped_column(String(512), nullable=True, index=True)  # the server running it
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # clock ticks since boot
    stop_request: Mapped[StopRequest | None] = mapped_column(_values(StopRequest, 16), nullable=True)
    signalled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics_offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of metrics.jsonl read
    metrics_last_line: Mapped[str] = mapped_column(Text, default="")  # tells a rewritten file (resume)
    last_step: Mapped[int] = mapped_column(Integer, default=0)  # newest step turned into an event
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    project: Mapped[str] = mapped_column(String(64), default="default", index=True)  # its API key's
    started_ns: Mapped[int] = mapped_column(BigInteger, default=0)  # its newest attempt's start: projects' turns
    queued_ns: Mapped[int] = mapped_column(BigInteger, default=0)  # when it last queued: --preempt-after
    model_deleted_at: Mapped[int | None] = mapped_column(Integer, nullable=True)  # DELETE /v1/models/{its model}


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(8))  # message | metrics
    data: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)


class Export(Base):
    """A merged model made from a finished job by `dpo-lora export`, run like a job's process."""

    __tablename__ = "exports"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | failed
    options: Mapped[dict] = mapped_column(JSON)
    directory: Mapped[str] = mapped_column(Text)
    error: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    runner: Mapped[str | None] = mapped_column(String(512), nullable=True)  # the server running it
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Upload(Base):
    """A file sent in parts (OpenAI's Uploads); each part is a file in `directory` named by its id."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(128))
    bytes: Mapped[int] = mapped_column(BigInteger)  # what the parts must add up to
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | completed | cancelled | expired
    file_lifetime: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the File's expires_after
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # once completed
    directory: Mapped[str] = mapped_column(Text)


class Runner(Base):
    """A server on this store, and when its scheduler last showed it alive (serve/failover.py)."""

    __tablename__ = "runners"
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    heartbeat_at: Mapped[float] = mapped_column(Float)  # time.time()


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(Integer)


def _add_missing_columns(connection) -> None:
    """A store an older dpo-lora made lacks the columns added since: add each, filled with its
    default in the rows already there (Alembic compares the tables with these models). Other
    differences are left alone; a column with no default to fill old rows with is refused."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    context = MigrationContext.configure(connection)
    operations = Operations(context)
    for difference in compare_metadata(context, Base.metadata):
        if difference[0] != "add_column":
            continue
        _, _, table, column = difference
        default = column.default
        value = None if default is None else default.arg(None) if default.is_callable else default.arg  # list -> []
        if value is None and not column.nullable:
            raise UserError(f"the job store lacks {table}.{column.name}, which has no default: start on a new database")  # fmt: skip
        fill = None
        if value is not None:
            value = json.dumps(value) if isinstance(value, (list, dict)) else value
            fill = text(str(literal(value).compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True})))
        operations.add_column(table, Column(column.name, column.type, nullable=column.nullable, server_default=fill))
        print(
            f"dpo-lora serve: the job store gained {table}.{column.name} (made by an older dpo-lora)", file=sys.stderr
        )


class Store:
    """One database; `with store.session() as s:` commits on success and rolls back on error."""

    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # Every transaction takes SQLite's write lock when it begins, so a read-modify-write
            # (cancel a job the scheduler is claiming, the next queue position) is never interleaved.
            event.listen(self.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":  # servers starting together create the tables once
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(5417001)")
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self):
        with self._sessions() as session, session.begin():
            yield session

    def add_event(self, session: Session, job_id: str, message: str, level: str = "info", data=None) -> None:
        session.flush()  # a job added in this session is inserted before its event (no ORM relationships)
        session.add(
            Event(
                id=new_id("ftevent"),
                job_id=job_id,
                created_at=now(),
                level=level,
                message=message,
                type="metrics" if data is not None else "message",
                data=data,
            )
        )

    @staticmethod
    def for_update(session: Session, model, key: str):
        """The row, locked until the transaction ends (a no-op lock on SQLite, which already holds
        its write lock): what a read-modify-write reads."""
        return session.get(model, key, with_for_update=True)

    @staticmethod
    def lock_project(session: Session, project: str) -> None:
        """Serialize this transaction with every other that locks the same project, until it ends:
        what a count-then-insert against a project's quota takes (SQLite's write lock already does)."""
        if session.get_bind().dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"project:{project}".encode()).digest()[:8], "big", signed=True)
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def next_queue_seq(self, session: Session) -> int:
        return (session.scalar(select(func.max(Job.queue_seq))) or 0) + 1

    def claim(self, job_id: str, devices: list, attempt: int, runner: str) -> bool:
        """Atomically move a queued job to running on `runner`'s `devices`; False if another server
        took it (or it was cancelled or paused) first."""
        with self.session() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.RUNNING,
                    devices=devices,
                    runner=runner,
                    attempt=attempt,
                    stop_request=None,
                    signalled_at=None,
                    started_ns=time.time_ns(),
                )
            )
            if result.rowcount == 1:
                self.add_event(session, job_id, f"Fine-tuning job started (attempt {attempt}, devices {devices})")
            return result.rowcount == 1

    def claim_export(self, export_id: str, runner: str) -> bool:
        """Atomically take a queued export for `runner`; False if another server took it first."""
        with self.session() as session:
            result = session.execute(
                update(Export)
                .where(Export.id == export_id, Export.status == "queued")
                .values(status="running", runner=runner, attempt=Export.attempt + 1, pid=None, pid_start=None)
            )
            return result.rowcount == 1

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection, _record) -> None:
    connection.isolation_level = None  # transactions are begun by the "begin" listener, not by pysqlite
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    _switch_to_wal(cursor)  # readers never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed change survives a power cut
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor, seconds: float = 30.0) -> None:
    """Connections opening a new database at once (a server's threads, several stores): the switch
    to WAL needs the file to itself, and SQLite answers "locked" at once there instead of waiting."""
    import sqlite3

    deadline = time.monotonic() + seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
