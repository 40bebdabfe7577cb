"""A fixed mmap threshold returns freed large tensors to the system (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpo_lora.cpu_memory import cap_heap_fragmentation

# Interleave 6 MB activations with small long-lived tensors, as a checkpointed backward does, free
# the large ones, and report how much the process still holds.
PROBE = """
import sys, torch
from dpo_lora.cpu_memory import cap_heap_fragmentation
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
