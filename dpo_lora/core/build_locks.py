"""Stale locks of torch's JIT extension builds, which would otherwise hang a run forever.

DeepSpeed compiles some kernels on first use (its CPU Adam, the CPU shared-memory allreduce)
through torch's `cpp_extension`. The build holds `<extensions dir>/<op>/lock`; every other process
that needs the op waits, with no timeout and no message, until that file is gone. A build that was
killed (SIGKILL, a lost node, a job's time limit) leaves the file behind, and each later run that
needs the op then sits at start-up with nothing said: seen here as a CI run stuck for 10 minutes.

A live build keeps the lock open until it finishes, so a lock that no process on this host has
open, and that is older than any build, is stale. The age matters on a home directory shared by
several hosts, where the builder may be a process on another host.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_AFTER_S = 600.0  # a kernel build takes 1-3 minutes on 2 cores; ten is far beyond any build


def extensions_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, or the per-user cache."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0):
    """Remove the build locks under `root` that no process holds; return their paths.

    A lock that some process on this host has open belongs to a live build: it is left alone (torch
    waits for it). An unheld lock younger than `stale_after_s` may belong to a build on another
    host: this waits, saying so once, until it is gone or has grown stale."""
    root = extensions_root() if root is None else root
    if not root.is_dir():
        return []
    removed = []
    # `<root>/<op>/lock` with $TORCH_EXTENSIONS_DIR, `<root>/py311_cpu/<op>/lock` without it.
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        if _wait_until_stale_or_gone(lock, stale_after_s, poll_s):
            lock.unlink(missing_ok=True)  # another rank of this host may have removed it first
            removed.append(lock)
            print(
                f"dpo-lora: removed {lock}: a stale lock of a kernel build that was killed "
                "(no process holds it); the kernel is rebuilt if needed",
                file=sys.stderr,
            )
    return removed


def _wait_until_stale_or_gone(lock: Path, stale_after_s: float, poll_s: float) -> bool:
    """True when `lock` is stale; False when it is gone or held by a process of this host."""
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if _held_on_this_host(lock):
            return False
        if age >= stale_after_s:
            return True
        if not said:
            print(
                f"dpo-lora: waiting for {lock}: a kernel build holds it, here or on a host sharing this "
                f"directory; it counts as stale {stale_after_s:.0f} s after it was made",
                file=sys.stderr,
            )
            said = True
        time.sleep(poll_s)


def _held_on_this_host(lock: Path) -> bool:
    """Whether any process here has `lock` open (the builder keeps it open until it is done).
    Processes whose descriptors this user cannot read are not seen."""
    target = os.path.realpath(lock)
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs (not Linux): assume a live build rather than break one
        return True
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            descriptors = list(fd_dir.iterdir())
        except OSError:  # another user's process, or one that just exited
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(descriptor) == target:
                    return True
            except OSError:
                continue
    return False
