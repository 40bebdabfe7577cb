"""Multi-rank behaviour: a failing rank ends the job, launchers, and a real two-host run.

The two hosts are network namespaces joined by a veth pair on a private test subnet; each runs
launch/node.sh with one rank, exactly as two cluster nodes without ssh would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dpo_lora.core import distributed
from dpo_lora.core.config import dump_yaml
from dpo_lora.core.distributed import gathered, rank_failure_message

from ..conftest import HOST_INTERFACE, HOSTS, REPO, VENV_BIN, venv_env
from ..train.test_checkpoints import train_rows
from ..train.test_loop import tiny_config

LAUNCHERS = ["single_node.sh", "multi_node.sh", "node.sh", "slurm.sbatch"]


def write_config(model_dir, output_dir, *overrides) -> str:
    path = output_dir.parent / f"{output_dir.name}.yaml"
    config = tiny_config(model_dir, output_dir, "train.micro_batch_size=2", "data.eval=null", *overrides)
    path.write_text(dump_yaml(config))
    return str(path)


def test_rank_failure_message_names_the_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert rank_failure_message(RuntimeError("x")) is None  # a world of one keeps its traceback
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    lost = rank_failure_message(RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:1234"))
    assert lost.startswith("dpo-lora: rank 2 of 4: lost contact with another rank")
    assert rank_failure_message(ValueError("bad\nsecond line")) == "dpo-lora: rank 2 of 4 failed: ValueError: bad"


def test_a_collective_timeout_is_named_with_its_key(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "_timeout_s", 30)
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation")
    assert rank_failure_message(gloo).startswith(
        "dpo-lora: rank 0 of 2: no reply from another rank within train.collective_timeout_s=30 s"
    )
    nccl = RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)")
    assert "train.collective_timeout_s=30 s" in rank_failure_message(nccl)


class _Handed(Exception):
    """Raised by the fake collective once it has seen the tensor it was handed."""


@pytest.fixture
def two_rank_world_on(monkeypatch):
    """A pretend 2-rank world whose device is `meta`, standing in for a GPU: a group started with
    plain NCCL has no CPU backend, so every tensor a collective gets must be on the rank's device.
    Returns the devices the collectives were handed."""
    import torch.distributed as dist

    seen = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise _Handed

    def broadcast_object_list(objects, src=0, group=None, device=None):
        seen.append(torch.device(device) if device is not None else torch.device("cpu"))
        raise _Handed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(distributed, "_collective_device", torch.device("meta"))
    return seen


def test_every_collective_of_the_trainer_runs_on_the_ranks_device(two_rank_world_on):
    from dpo_lora.train.guards import StopRequest
    from dpo_lora.train.loop import _reward_sums
    from dpo_lora.train.losses import kto_kl
    from dpo_lora.train.metrics import PAIR_METRICS, MetricWindow

    window = MetricWindow()
    window.add({name: torch.ones(2) for name in PAIR_METRICS}, tokens=10)
    stop = StopRequest()
    stats = {"rewards/chosen": torch.ones(2), "rewards/rejected": torch.zeros(2)}
    callers = {
        "metric window": window.reduce,
        "stop request": stop.agreed,
        "stop request (any rank)": lambda: distributed.any_rank(True),
        "numeric guard": lambda: distributed.any_rank_flag(torch.tensor(True)),
        "bco_pair reward sums": lambda: _reward_sums([(stats, 4)]),
        "reference cache decision": lambda: distributed.broadcast_from_main(True),
        "kto reference point": lambda: kto_kl(torch.ones(2), torch.zeros(2), reduce=distributed.all_reduce_sum),
    }
    try:
        for name, call in callers.items():
            with pytest.raises(_Handed):
                call()
            assert two_rank_world_on[-1] == torch.device("meta"), (
                f"{name} handed a collective a tensor on the wrong device"
            )
    finally:
        stop.restore()
    assert len(two_rank_world_on) == len(callers)


def test_a_world_of_one_starts_without_compiling_the_shared_memory_allreduce():
    """One rank has nothing to reduce across processes; the kernel's JIT build cost ~55 s per fresh
    install. The process group still works (a collective runs) without it."""
    code = (
        "import importlib, torch, deepspeed.comm\n"
        "from dpo_lora.core.distributed import init_distributed\n"
        "info = init_distributed()\n"
        "cdb = importlib.import_module('deepspeed.comm.comm').cdb\n"
        "value = torch.tensor([2.0])\n"
        "deepspeed.comm.all_reduce(value)  # DeepSpeed's own collective, through its backend\n"
        "print('shm', cdb.shm_comm_op, info.world_size, float(value[0]))\n"
    )
    env = venv_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shm None 1 2.0" in result.stdout
    assert "built successfully" not in result.stdout + result.stderr


def test_two_cpu_ranks_reduce_without_the_kernel_and_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU backend left a 64 MiB /dev/shm segment per rank after every multi-rank run
    (it never unlinks them); training reduces through torch.distributed without its kernel."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "import torch, deepspeed.comm\n"
        "from dpo_lora.core.distributed import init_distributed\n"
        "info = init_distributed()\n"
        "value = torch.tensor([float(info.rank + 1)])\n"
        "deepspeed.comm.all_reduce(value)\n"
        "print(f'rank {info.rank} of {info.world_size} sum {float(value[0])}')  # one write: ranks share the pipe\n"
    )
    port = "29697"
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(script)]
    result = subprocess.run(command, cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 of 2 sum 3.0" in result.stdout and "rank 1 of 2 sum 3.0" in result.stdout
    assert "built successfully" not in result.stdout + result.stderr
    left = [name for name in os.listdir("/dev/shm") if f"_{port}_" in name]
    assert left == []


def test_gathered_is_a_no_op_for_unpartitioned_parameters():
    weight = torch.nn.Parameter(torch.arange(4.0))
    with gathered([weight]):
        assert torch.equal(weight, torch.arange(4.0))


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_a_dead_rank_ends_the_whole_job_quickly_and_is_named(tiny_model_dir, tmp_path, mode):
    """Rank 1 is SIGKILLed (as by the OOM killer) or raises at its 3rd micro-batch: the launcher
    must exit non-zero soon after, naming the rank, instead of rank 0 hanging in a collective."""
    config = write_config(tiny_model_dir, tmp_path / "run", "train.max_steps=200")
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29680 + len(mode))]
    command += ["--module", "tests.core.fault_rank", "train", config]
    stamp = tmp_path / "fault-time"
    env = venv_env(DPO_LORA_FAULT=f"{mode}:1:3", DPO_LORA_FAULT_STAMP=str(stamp))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    # Timed from the fault, not the launch: start-up varies with the machine's load (20-100 s seen).
    elapsed = time.time() - float(stamp.read_text())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s after the fault: a rank hung after its peer died"  # hangs are 30 min
    assert "dpo-lora: rank 0 of 2: lost contact with another rank" in output, output[-3000:]
    if mode == "kill":
        assert "--local_rank=1" in output and "exits with return code = -9" in output, output[-3000:]
    else:
        assert "dpo-lora: rank 1 of 2 failed: RuntimeError: planted fault" in output, output[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tiny_model_dir, tmp_path):
    """Rank 1 hangs without dying at its 3rd micro-batch (a stuck kernel, a dead filesystem): rank 0's
    next collective fails after train.collective_timeout_s, naming the key, and the launcher ends
    the job, where torch's default would hold every rank for 30 minutes."""
    timeout = 30
    config = write_config(
        tiny_model_dir, tmp_path / "run", "train.max_steps=200", f"train.collective_timeout_s={timeout}"
    )
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29690"]
    command += ["--module", "tests.core.fault_rank", "train", config]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env=venv_env(DPO_LORA_FAULT="hang:1:3")
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Start-up (~20-40 s), the timeout, then the launcher's 30 s grace between SIGTERM and SIGKILL
    # for the rank that still hangs: ~100 s measured, against torch's default of 30 minutes.
    assert timeout < elapsed < 240, f"took {elapsed:.0f} s"
    said = f"dpo-lora: rank 0 of 2: no reply from another rank within train.collective_timeout_s={timeout} s"
    assert said in output, output[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launchers_answer_help_and_name_the_interface_variables(script):
    result = subprocess.run(["bash", str(REPO / "launch" / script), "--help"], capture_output=True, text=True)
    if script == "slurm.sbatch":  # not a CLI; its header is the documentation
        result = subprocess.CompletedProcess([], 0, (REPO / "launch" / script).read_text(), "")
    assert result.returncode == 0, result.stderr
    assert "CONFIG" in result.stdout and "GLOO_SOCKET_IFNAME" in result.stdout


def test_node_sh_names_a_missing_variable():
    env = venv_env()
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR"):
        env.pop(var, None)
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "node.sh"), "c.yaml"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2 and "set NNODES" in result.stderr


def assert_two_ranks_train_like_one_process(model_dir, tmp_path, overrides: list[str]) -> None:
    """The 2-rank run in tmp_path/hosts equals one process with the same global batch (2 ranks x 2
    = 1 rank x 2 x accumulation 2), and rank 0 alone wrote its outputs: each step once, one adapter."""
    single = write_config(model_dir, tmp_path / "single", "train.grad_accum=2", *overrides)
    result = subprocess.run([sys.executable, "-m", "dpo_lora", "train", single], cwd=REPO, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    hosts_rows, single_rows = train_rows(tmp_path / "hosts"), train_rows(tmp_path / "single")
    assert sorted(hosts_rows) == sorted(single_rows) == [1, 2, 3, 4]
    for step, row in hosts_rows.items():
        assert row["world_size"] == 2
        for name in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert row[name] == pytest.approx(single_rows[step][name], rel=1e-4, abs=1e-6), (step, name)
    lines = [json.loads(line) for line in (tmp_path / "hosts" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == [1, 2, 3, 4], "rank 0 alone logs, each step once"
    assert (tmp_path / "hosts" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_hosts_through_node_sh_train_like_one_process(two_hosts, tiny_model_dir, tmp_path):
    master = HOSTS[0][1]
    overrides = ["train.max_steps=4", "train.log_every=1"]
    config = write_config(tiny_model_dir, tmp_path / "hosts", "train.grad_accum=1", *overrides)
    nodes = []
    for node_rank, (namespace, _) in enumerate(HOSTS):
        env = venv_env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR=master, MASTER_PORT="29571")
        env.update(NPROC_PER_NODE="1", GLOO_SOCKET_IFNAME=HOST_INTERFACE)
        command = ["ip", "netns", "exec", namespace, "bash", str(REPO / "launch" / "node.sh"), config]
        nodes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr.decode()[-3000:]

    assert_two_ranks_train_like_one_process(tiny_model_dir, tmp_path, overrides)
    assert b"dpo:" in outputs[0][1] and b"dpo:" not in outputs[1][1]  # the progress bar is rank 0's
