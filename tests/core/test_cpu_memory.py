"""A fixed mmap threshold returns freed large tensors to the system (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpo_lora.core.cpu_memory import cap_heap_fragmentation

# Interleave 6 MB activations with small long-lived tensors, as a checkpointed backward does, free
# the large ones, and report how much the process still holds.
PROBE = """
import sys, torch
from dpo_lora.core.cpu_memory import cap_heap_fragmentation
capped = cap_heap_fragmentation(int(sys.argv[1]))
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
warm = torch.empty(12 << 20, dtype=torch.uint8); warm.fill_(1); del warm  # lets glibc raise its threshold
before = resident()
big, small = [], []
for _ in range(100):
    big.append(torch.ones(6 << 20, dtype=torch.uint8))
    small.append(torch.ones(4096, dtype=torch.uint8))
del big
print(capped, (resident() - before) / 2**20)
"""


def held_after_free(threshold_mb: int) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], capture_output=True, text=True, check=True)
    capped, held_mb = out.stdout.split()
    return capped == "True", float(held_mb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_capped_heap_returns_freed_tensors_and_default_keeps_them():
    default_capped, default_held = held_after_free(0)
    capped, capped_held = held_after_free(4)
    assert not default_capped and capped
    assert default_held > 300  # glibc keeps most of the 600 MB: the 4 KB tensors pin the heap
    assert capped_held < 50


def test_zero_changes_nothing():
    assert cap_heap_fragmentation(0) is False


# Allocate a 64 MB tensor and report whether any of the process's memory sits on huge pages.
HUGE_PAGE_PROBE = """
import contextlib, io, sys
from dpo_lora.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])  # the CLI sets torch's switch before anything imports torch
assert "torch" not in sys.modules
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages")))
"""


def thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def huge_kb(**env) -> int:
    from ..conftest import venv_env

    out = subprocess.run(
        [sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True, text=True, check=True, env=venv_env(**env)
    )
    return int(out.stdout)


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs the kernel's transparent huge pages in madvise mode")
def test_the_cli_puts_large_tensors_on_huge_pages_unless_told_not_to():
    assert huge_kb() >= 32 << 10  # most of the 64 MB tensor
    assert huge_kb(THP_MEM_ALLOC_ENABLE="0") == 0  # the user's setting wins
