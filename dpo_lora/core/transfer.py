"""Host-to-device copies that do not make the host wait (a leaf).

A plain `tensor.to("cuda")` from pageable memory waits for the device's queue to drain before it
copies, so every such copy in a training step stalls the host until the GPU catches up. From pinned
memory with `non_blocking=True` the copy is queued like a kernel; torch's pinned-memory allocator
keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`, queued without waiting on CUDA; as is elsewhere."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
