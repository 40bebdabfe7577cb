"""Process-group setup and the few collectives the trainer needs, on any accelerator."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from dpo_lora.core.rundir import RANK_PREFIX


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Where this rank's collectives put their tensors. A group DeepSpeed starts with plain `nccl` has
# no CPU backend, so a CPU tensor handed to a collective fails there ("No backend type associated
# with device type cpu"). Moving the few scalars the trainer reduces onto the rank's device costs
# one tiny copy; the alternative, a second (gloo) backend for CPU tensors, would need its own
# sockets (GLOO_SOCKET_IFNAME) on every multi-node run for no gain.
_collective_device = torch.device("cpu")


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join the process group set up by any launcher (deepspeed, torchrun) or make a 1-rank one.

    The backend and device come from DeepSpeed's accelerator: NCCL on CUDA, gloo on the CPU.
    `timeout_s` (train.collective_timeout_s): how long a collective waits for the other ranks
    before it fails, so a hung rank ends the job instead of holding every GPU of it.
    """
    global _collective_device, _timeout_s
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # A plain `dpo-lora train` is a world of one; give it the rendezvous a launcher would.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    invented = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    invented = {key: value for key, value in invented.items() if key not in os.environ}
    os.environ.update(invented)
    _skip_shared_memory_allreduce()
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), timeout=timedelta(seconds=timeout_s)
    )
    _timeout_s = timeout_s
    for key in invented:  # processes started later must not inherit a port this one holds
        del os.environ[key]
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    _collective_device = device
    return DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=local_rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        device=device,
    )


def _skip_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce kernel at every start (~55 s
    on a fresh install with 2 cores, ~4 s after) and gives each rank a 64 MiB /dev/shm segment
    that it never unlinks: every multi-rank CPU run left 64 MiB of RAM per rank behind (12 GiB here
    after a few days of tests). Only its `inference_all_reduce` (tensor-parallel inference) uses
    the kernel; training's collectives go through torch.distributed either way. Without the kernel
    the backend falls back to torch.distributed, as on GPUs."""
    import importlib

    # By name: the package's `torch` attribute is PyTorch itself, which `import ... as` would bind.
    torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(torch_comm, "build_shm_op"):
        torch_comm.build_shm_op = lambda: None


def peak_memory_bytes() -> int:
    """This rank's peak memory so far: the device allocator's peak on an accelerator (what
    `torch.cuda.max_memory_allocated` reports), the process's peak RSS on the CPU."""
    from deepspeed.accelerator import get_accelerator

    return int(get_accelerator().max_memory_allocated())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over all ranks, reduced on the rank's device; returned on the CPU."""
    import torch.distributed as dist

    if not _multi_rank():
        return values
    on_device = values.to(_collective_device, copy=True)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    return all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0


def any_rank_flag(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor (on the rank's device), true on every rank when it is true on any rank;
    reduced on the device, so the host does not wait for it."""
    import torch.distributed as dist

    if not _multi_rank():
        return flag
    as_number = flag.to(_collective_device, torch.float32)
    dist.all_reduce(as_number, op=dist.ReduceOp.MAX)
    return as_number.to(flag.device) > 0


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    import torch.distributed as dist

    if not _multi_rank():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=_collective_device)
    return holder[0]


def gather_lists(local: list) -> list:
    """Concatenate a small Python list from every rank, in rank order (same result on all ranks)."""
    import torch.distributed as dist

    if not _multi_rank():
        return list(local)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)  # pickles onto the current device (set in init_distributed)
    return [item for part in gathered for item in part]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def gathered(params):
    """Inside the block, ZeRO-3-partitioned `params` hold their full tensors on every rank.

    Every rank must enter (it is a collective); a no-op for parameters ZeRO-3 did not partition.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


# How a collective reports that the other end went away (gloo, NCCL, c10d store).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
# gloo's and NCCL's words for a collective that outlived the process group's timeout.
_TIMED_OUT = ("Timed out waiting", "before timing out", "Watchdog caught collective operation timeout")
_timeout_s: float | None = None  # the process group's timeout, set by init_distributed


def rank_failure_message(err: BaseException) -> str | None:
    """The one line naming this rank for an exception in a multi-rank job; None in a world of one.

    A rank that died is named by the launcher (DeepSpeed: "... --local_rank=N ... exits with
    return code"; torchrun: "rank: N"); the survivors, whose collectives fail, say so in one line
    instead of a traceback. An exception raised on this rank keeps its traceback, then this line.
    """
    import traceback

    import torch.distributed as dist

    rank, world_size = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None or world_size == 1:
        return None
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if any(sign in str(err) for sign in _TIMED_OUT):
        waited = f"train.collective_timeout_s={_timeout_s:g} s" if _timeout_s is not None else "the collective timeout"
        return (
            f"{RANK_PREFIX} {rank} of {world_size}: no reply from another rank within {waited}; a rank "
            f"hung (or works alone longer than that: raise the key): {type(err).__name__}: {text}"
        )
    if isinstance(err, dist.DistError) or any(sign in str(err) for sign in _PEER_LOST):
        return (
            f"{RANK_PREFIX} {rank} of {world_size}: lost contact with another rank, which failed or was "
            f"killed (its own message or the launcher's names it): {type(err).__name__}: {text}"
        )
    traceback.print_exc()
    return f"{RANK_PREFIX} {rank} of {world_size} failed: {type(err).__name__}: {text}"
