"""A killed kernel build's lock is removed; a live build's is left to torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dpo_lora.core.build_locks import clear_stale_build_locks, extensions_root


def make_lock(root, op: str, age_s: float = 0.0):
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_an_old_lock_nobody_holds_is_removed_and_named(tmp_path, capsys):
    stale = make_lock(tmp_path, "cpu_adam", age_s=3600)
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists()
    assert str(stale) in capsys.readouterr().err


def test_a_lock_held_open_by_a_live_build_is_left_alone_without_waiting(tmp_path):
    held = make_lock(tmp_path, "cpu_adam", age_s=3600)  # even an old one: the builder still runs
    builder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; os.open({str(held)!r}, os.O_RDONLY); print(1, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        builder.stdout.readline()  # the lock is open
        started = time.monotonic()
        assert clear_stale_build_locks(tmp_path) == []
        assert held.exists() and time.monotonic() - started < 5
    finally:
        builder.kill()


def test_a_young_unheld_lock_is_waited_for_until_it_is_stale(tmp_path, capsys):
    young = make_lock(tmp_path, "deepspeed_shm_comm")
    started = time.monotonic()
    assert clear_stale_build_locks(tmp_path, stale_after_s=0.6, poll_s=0.05) == [young]
    assert time.monotonic() - started >= 0.5
    err = capsys.readouterr().err
    assert f"waiting for {young}" in err and f"removed {young}" in err


def test_a_lock_released_while_waiting_ends_the_wait(tmp_path):
    young = make_lock(tmp_path, "cpu_adam")
    remover = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(0.3); os.remove({str(young)!r})"])
    assert clear_stale_build_locks(tmp_path, stale_after_s=30, poll_s=0.05) == []
    remover.wait()


def test_the_root_is_torch_extensions_dir_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    stale = tmp_path / "cpu_adam" / "lock"  # with the variable set, ops sit right under it
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (0, 0))
    assert clear_stale_build_locks() == [stale]


@pytest.mark.parametrize("missing", [True, False])
def test_no_locks_or_no_root_is_nothing_to_do(tmp_path, missing):
    root = tmp_path / "absent" if missing else tmp_path
    assert clear_stale_build_locks(root) == []
