"""Shared fixtures: a tiny tokenizer and a tiny random Llama, built offline in milliseconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each (and in the processes they start). Two
    # threads each would put four spinning OpenMP threads on two cores, which slowed a SmolLM2
    # job ~6x when the other worker was computing too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if "DPO_LORA_CACHE" not in os.environ:  # tests (and the processes they start) tokenize into their own cache
    import tempfile

    os.environ["DPO_LORA_CACHE"] = tempfile.mkdtemp(prefix="dpo-lora-test-cache-")
REPO = Path(__file__).resolve().parent.parent
# The venv's console scripts (deepspeed, torchrun), found even when the venv is not activated.
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def venv_env(**extra: str) -> dict[str, str]:
    """This process's environment with the venv's bin first on PATH, plus `extra`."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


SENTIMENT_TRAIN = REPO / "tests" / "data" / "templated" / "train.jsonl"
SENTIMENT_EVAL = REPO / "tests" / "data" / "templated" / "eval.jsonl"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = []
    for path in (SENTIMENT_TRAIN, SENTIMENT_EVAL):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return texts + ["The quick brown fox jumps over the lazy dog.", "user", "assistant", "system"]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A Hugging Face model folder (float32 safetensors + tokenizer) of a tiny random Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed's ZeRO-3 swaps `torch.nn.functional.linear` for its own autograd function and
    leaves it there: a later test in the same worker would then save other tensors for backward
    (tests/model/test_memory_plan.py counts them). A training process, one run each, never notices."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Let DeepSpeed run fp16 (loss scaling) on this CPU. Its CPU accelerator reports fp16 as
    unsupported unless oneDNN has native fp16 kernels; torch computes fp16 on any CPU (slowly), so
    the tests lift that check to run DeepSpeed's real fp16 path: loss scaler, overflow skips,
    and the scaler in checkpoints."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)


# Two test hosts: network namespaces joined by a veth pair on a private test subnet. Each end has
# the same name inside its namespace, as cluster nodes share an interface name (eth0, ib0), so one
# GLOO_SOCKET_IFNAME serves every host.
HOSTS = (("dpolora-a", "10.213.7.1"), ("dpolora-b", "10.213.7.2"))
HOST_INTERFACE = "dpo0"


def _kill_namespace_processes(namespace: str) -> None:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    for pid in listed.stdout.split():
        subprocess.run(["kill", "-9", pid], capture_output=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair; skipped where namespaces are not permitted."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    (a, _), (b, _) = HOSTS

    def cleanup():
        for namespace, _ in HOSTS:
            _kill_namespace_processes(namespace)  # a process left inside would outlive its namespace
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        # A setup interrupted before the pair moved into the namespaces leaves it here, and every
        # later setup would then fail with "File exists" (deleting one end deletes both).
        subprocess.run(["ip", "link", "del", "veth-dpoa"], capture_output=True)

    cleanup()
    setup = [["ip", "netns", "add", a], ["ip", "netns", "add", b]]
    setup += [["ip", "link", "add", "veth-dpoa", "type", "veth", "peer", "name", "veth-dpob"]]
    for (namespace, address), veth in zip(HOSTS, ("veth-dpoa", "veth-dpob"), strict=True):
        setup += [["ip", "link", "set", veth, "netns", namespace]]
        setup += [["ip", "-n", namespace, "link", "set", veth, "name", HOST_INTERFACE]]
        setup += [["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", HOST_INTERFACE]]
        setup += [
            ["ip", "-n", namespace, "link", "set", HOST_INTERFACE, "up"],
            ["ip", "-n", namespace, "link", "set", "lo", "up"],
        ]
    for command in setup:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            cleanup()
            reason = f"network namespaces not permitted here ({' '.join(command)}: {result.stderr.strip()})"
            if os.environ.get("CI"):  # .ci/run runs as root with iproute2: there it must work
                pytest.fail(reason)
            pytest.skip(reason)
    yield
    cleanup()


@pytest.fixture(scope="session")
def slurm():
    """A real one-node SLURM cluster for the session (tests/launch/slurm_cluster.py); the environment its
    clients and jobs need: SLURM_CONF, and this interpreter for the jobs."""
    import tempfile

    from .launch import slurm_cluster

    if reason := slurm_cluster.unavailable_reason():
        if os.environ.get("CI"):
            pytest.fail(f"the SLURM cluster must start in CI: {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="dpo-lora-slurm-"))
    env = slurm_cluster.start(folder)
    yield venv_env(**env, PYTHON=sys.executable, GLOO_SOCKET_IFNAME="lo")
    slurm_cluster.stop(folder, env)


# Fixtures that own a machine-wide resource: the fixed network-namespace names of `two_hosts`, and
# the SLURM cluster (one per worker would be two clusters on one node).
MACHINE_WIDE = ("two_hosts", "slurm")
# The groups that take longest (3-6 min each on 2 cores), handed out first so that the two workers
# end together; the rest follow in collection order.
LONGEST_FIRST = (
    "two_hosts",
    "tests/serve/test_scheduler.py",
    "slurm",
    "tests/commands/test_integration_smollm2.py",
    "tests/train/test_parity.py",
    "tests/commands/test_methods_smollm2.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n 2 --dist loadgroup` (`make test`) a module is one unit of work, so its
    module-scoped fixtures are built once; every module that uses a machine-wide fixture joins
    that fixture's group, so one worker holds the resource. The longest groups go first."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers, where collection runs
        return
    groups: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        used = [name for name in MACHINE_WIDE if name in getattr(item, "fixturenames", ())]
        if used or module not in groups:
            groups[module] = used[0] if used else groups.get(module, module)

    def group(item) -> str:
        return groups[item.nodeid.split("::")[0]]

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))
