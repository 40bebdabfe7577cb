"""The classic DeepSpeed multi-node launch for real: `launch/multi_node.sh HOSTFILE CONFIG` from
host A reaches host B over ssh through DeepSpeed's pdsh runner.

The two hosts are network namespaces (tests/conftest.py), each running its own sshd with a
throwaway host key and a per-test authorized key. On the launching host, ~/.ssh is replaced (in
that process's own mount namespace only) by a folder holding the test's client key and config,
which is exactly what a user sets up for passwordless ssh.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import HOST_INTERFACE, HOSTS, REPO, venv_env
from ..core.test_distributed import assert_two_ranks_train_like_one_process, write_config

SSHD = "/usr/sbin/sshd"


@pytest.fixture
def ssh_hosts(two_hosts, tmp_path):
    """sshd on both hosts; returns the folder to mount as the launching user's ~/.ssh."""
    if shutil.which("pdsh") is None or not shutil.which(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssh-server, openssh-client and pdsh (apt-get install openssh-server pdsh)")
    keys = tmp_path / "ssh"
    dot_ssh = tmp_path / "dot-ssh"
    keys.mkdir()
    dot_ssh.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    (dot_ssh / "config").write_text(
        f"Host {' '.join(address for _, address in HOSTS)}\n"
        f"  IdentityFile {keys / 'client_key'}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    daemons = []
    for namespace, address in HOSTS:
        config = keys / f"sshd_{namespace}.conf"
        config.write_text(
            f"ListenAddress {address}\nHostKey {keys / 'host_key'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nPidFile {keys / (namespace + '.pid')}\n"
        )
        command = ["ip", "netns", "exec", namespace, SSHD, "-D", "-e", "-f", str(config)]
        daemons.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 20
    for namespace, address in HOSTS:  # wait until each sshd accepts the client key
        while run_on_a(dot_ssh, ["ssh", address, "true"]).returncode != 0:
            assert time.monotonic() < deadline, f"sshd on {namespace} did not come up"
            time.sleep(0.2)
    yield dot_ssh
    for daemon in daemons:
        daemon.kill()
        daemon.wait()


def run_on_a(dot_ssh, command: list[str], background: bool = False, **kwargs):
    """Run `command` on host A with `dot_ssh` as the user's ~/.ssh (bind-mounted in this command's
    own mount namespace, which `ip netns exec` creates: the real ~/.ssh is untouched)."""
    script = 'mkdir -p "$HOME/.ssh" && mount --bind "$0" "$HOME/.ssh" && exec "$@"'
    full = ["ip", "netns", "exec", HOSTS[0][0], "bash", "-c", script, str(dot_ssh), *command]
    if background:
        return subprocess.Popen(full, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    return subprocess.run(full, cwd=REPO, capture_output=True, text=True, timeout=60, **kwargs)


def launch_env(port: int) -> dict[str, str]:
    return venv_env(GLOO_SOCKET_IFNAME=HOST_INTERFACE, MASTER_PORT=str(port))


def write_hostfile(tmp_path) -> str:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{address} slots=1\n" for _, address in HOSTS))
    return str(hostfile)


def test_hostfile_launch_over_ssh_trains_like_one_process(ssh_hosts, tiny_model_dir, tmp_path):
    overrides = ["train.max_steps=4", "train.log_every=1"]
    config = write_config(tiny_model_dir, tmp_path / "hosts", "train.grad_accum=1", *overrides)
    launcher = ["bash", str(REPO / "launch" / "multi_node.sh"), write_hostfile(tmp_path), config]
    started = time.monotonic()
    process = run_on_a(ssh_hosts, launcher, background=True, env=launch_env(29581))
    output, _ = process.communicate(timeout=600)
    elapsed = time.monotonic() - started
    assert process.returncode == 0, output[-4000:]
    # pdsh prefixes each remote line with its host: rank 1 really ran on B, rank 0 on A.
    assert f"{HOSTS[1][1]}: " in output and f"{HOSTS[0][1]}: " in output, output[-3000:]
    # GLOO_SOCKET_IFNAME reached host B through the env file: DeepSpeed exports it in B's command.
    assert f"export GLOO_SOCKET_IFNAME={HOST_INTERFACE}" in output, output[-3000:]

    assert_two_ranks_train_like_one_process(tiny_model_dir, tmp_path, overrides)
    print(f"hostfile launch over ssh: {elapsed:.0f} s")


def rank_on_b() -> int | None:
    """The pid of the trainer rank (not its launcher) running on host B."""
    listed = subprocess.run(["ip", "netns", "pids", HOSTS[1][0]], capture_output=True, text=True).stdout.split()
    for pid in listed:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dpo_lora" in command and b"deepspeed.launcher.launch" not in command and b"-c" not in command:
            return int(pid)
    return None


def test_killing_the_remote_rank_ends_the_launch_naming_it(ssh_hosts, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tiny_model_dir, out, "train.max_steps=500", "train.log_every=1")
    launcher = ["bash", str(REPO / "launch" / "multi_node.sh"), write_hostfile(tmp_path), config]
    process = run_on_a(ssh_hosts, launcher, background=True, env=launch_env(29583))
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text()):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    pid = rank_on_b()
    assert pid is not None, "no trainer rank found on host B"
    remote_env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    # The env file carried these to host B, where DeepSpeed's pdsh command exported them.
    assert f"GLOO_SOCKET_IFNAME={HOST_INTERFACE}".encode() in remote_env
    assert any(item.startswith(b"DPO_LORA_CACHE=") for item in remote_env)
    killed = time.monotonic()
    subprocess.run(["kill", "-9", str(pid)], check=True)  # as the OOM killer would
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert time.monotonic() - killed < 90, "the launch hung after its remote rank died"
    assert "dpo-lora: rank 0 of 2: lost contact with another rank" in output, output[-3000:]
    remote = [line for line in output.splitlines() if line.startswith(f"{HOSTS[1][1]}: ")]
    assert any("exits with return code = -9" in line for line in remote), output[-3000:]
    assert not (out / "adapter").exists()
