"""The GPU check's steps (started by bench/gpu_check.sh): each a real `dpo-lora` process on the
GPU, each result read from the run's own files; one JSON file in bench/results/ at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "runs" / "gpu-check"
BASE = ["configs/demo.yaml", "--overwrite", "model.dtype=bfloat16", "train.max_steps=20", "train.log_every=5"]
CUDA_TESTS = [  # tests whose engines, models and kernels run on the GPU when one is present
    "tests/train/test_step.py", "tests/train/test_loop.py", "tests/train/test_guards.py", "tests/train/test_checkpoints.py",
    "tests/model/test_chunked_logps.py", "tests/data/test_layout.py", "tests/model/test_load.py",
    "tests/model/test_shared_attention.py",  # FlexAttention's gradients: CUDA only
    "tests/model/test_fused_lora.py",  # the fused function on bitsandbytes' CUDA kernels
]  # fmt: skip


def dpo_lora(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_lora", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def rows(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row and "eval/loss" not in row]


def summary(output_dir: Path, result: subprocess.CompletedProcess) -> dict:
    if result.returncode != 0:
        return {"ok": False, "error": result.stderr.strip().splitlines()[-1:] or ["(no output)"]}
    trained = rows(output_dir)
    last = trained[-1]
    return {
        "ok": True,
        "steps": last["step"],
        "first_loss": trained[0]["loss"],
        "last_loss": last["loss"],
        "pairs_per_s": last["pairs_per_s"],
        "peak_memory_gb": max(row.get("peak_memory_gb", 0.0) for row in trained),
    }


def train(name: str, *overrides: str) -> dict:
    out = WORK / name
    started = time.monotonic()
    result = dpo_lora("train", *BASE, f"output_dir={out}", *overrides)
    return {**summary(out, result), "seconds": round(time.monotonic() - started, 1), **planned(*overrides)}


def planned(*overrides: str) -> dict:
    """`dpo-lora plan`'s prediction for the same run, beside the measured peak_memory_gb (the
    allocator's peak, which leaves out the CUDA context the plan's fixed overhead stands for)."""
    from dpo_lora.model.memory_plan import FIXED_OVERHEAD

    result = dpo_lora("plan", *[arg for arg in (*BASE, *overrides) if arg != "--overwrite"], "--json")
    if result.returncode != 0:
        return {"plan_error": result.stderr.strip().splitlines()[-1:]}
    plan = json.loads(result.stdout)
    return {"plan_gb_without_fixed_overhead": (plan["total_bytes"] - FIXED_OVERHEAD) / 2**30}


def fp16_kill_and_resume() -> dict:
    """An fp16 run SIGKILLed after its step-10 checkpoint, resumed, against the uninterrupted run."""
    overrides = ["model.dtype=float16", "train.save_every=5", "train.scheduler=constant"]
    whole = train("fp16-whole", *overrides)
    out = WORK / "fp16-killed"
    command = [sys.executable, "-m", "dpo_lora", "train", *BASE, f"output_dir={out}", *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "step-00000010" / "COMPLETE"
    deadline = time.monotonic() + 180
    while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = dpo_lora("train", *BASE, f"output_dir={out}", *overrides, "--resume")
    report = summary(out, resumed)
    if report["ok"] and whole["ok"]:
        expected = {row["step"]: row["loss"] for row in rows(WORK / "fp16-whole")}
        report["max_loss_diff_vs_uninterrupted"] = max(abs(row["loss"] - expected[row["step"]]) for row in rows(out))
    return {"uninterrupted": whole, "killed_at_step_10_then_resumed": report}


def main() -> int:
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    started = time.monotonic()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report["tests"] = {"exit_code": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:]}
    report["bf16_default_layout"] = train("bf16-default")
    try:
        import flash_attn  # noqa: F401

        flash = ("model.attn_implementation=flash_attention_2", "train.pack_sequences=true")
        report["bf16_packed_flash_attention_2"] = train("bf16-packed-flash", *flash)
    except ImportError:
        report["bf16_packed_flash_attention_2"] = {"ok": None, "skipped": "flash_attn does not import here"}
    report["fp16"] = fp16_kill_and_resume()
    report["bf16_zero3_one_rank"] = train("bf16-zero3", "deepspeed=deepspeed_configs/zero3.json", "train.max_steps=10")
    report["seconds"] = round(time.monotonic() - started, 1)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written: {path}", file=sys.stderr)
    return 0 if all(part.get("ok", True) is not False for part in _parts(report)) and tests.returncode == 0 else 1


def _parts(report: dict):
    for value in report.values():
        if isinstance(value, dict):
            yield value
            yield from _parts(value)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
