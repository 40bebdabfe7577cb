"""How far bfloat16 puts the first update from float32's, and where.

    python bench/bf16_gradient_noise.py [--chosen-logps] [dotted.key=value ...]

Builds the run as `dpo-lora train` does (dpo_lora.train.setup; configs/demo.yaml with issue 12's
bf16-precision settings: micro-batch 2 x accumulation 2, lr 3e-4, ZeRO-0, online reference) once
in float32 and once in bfloat16, each in its own process, and takes the LoRA gradients of the
first optimizer step. At step 1 LoRA B is zero, so only B has gradients, and AdamW's first update
is about lr x sign(gradient): the script prints the gradients' relative error and cosine, the
fraction of B entries whose sign (so whose whole first update) differs, the relative difference of
those sign updates, and the relative error per projection and per layer. `--chosen-logps` takes
the gradient of the chosen completions' summed log-probs instead of the DPO loss: whether the error
is the bf16 forward and backward's own, or comes from the chosen-minus-rejected difference.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SETTINGS = [
    "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=4", "train.lr=3.0e-4",
    "train.scheduler=constant", "train.warmup_ratio=0", "lora.dropout=0.0", "dpo.reference=online",
    "train.self_check=false", "deepspeed=deepspeed_configs/zero0.json",
]  # fmt: skip


def first_step_gradients(dtype: str, out: Path, chosen_logps: bool, overrides: list[str]) -> None:
    """Child process: the run's first optimizer step's LoRA gradients, saved to `out`."""
    from dpo_lora.core.config import load_config
    from dpo_lora.data.layout import to_device
    from dpo_lora.train.setup import setup_run
    from dpo_lora.train.step import concatenated_logps, preference_step

    config = load_config(
        REPO / "configs/demo.yaml",
        [*SETTINGS, f"model.dtype={dtype}", f"output_dir={out.parent / dtype}", *overrides],
    )
    run = setup_run(config)
    stream = iter(run.batches)
    run.engine.train()
    for _ in range(config.train.grad_accum):
        batch = to_device(next(stream), run.dist.device)
        if chosen_logps:
            logps, _ = concatenated_logps(run.engine, batch)
            loss = logps[: logps.shape[0] // 2].sum()
        else:
            loss, _ = preference_step(run.engine, batch, config.dpo)
        run.engine.backward(loss)  # scaled by 1/grad_accum, accumulated into .grad at ZeRO-0
    grads = {name: p.grad.float().clone() for name, p in run.engine.module.named_parameters() if p.grad is not None}
    torch.save(grads, out)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def report(float32: dict, bfloat16: dict) -> None:
    names = [name for name in float32 if "lora_B" in name]
    exact = torch.cat([float32[n].flatten() for n in names]).double()
    noisy = torch.cat([bfloat16[n].flatten() for n in names]).double()
    cosine = float(exact @ noisy / exact.norm() / noisy.norm())
    print(
        f"LoRA B gradients, bfloat16 against float32: relative error {relative(exact, noisy):.4f}, cosine {cosine:.6f}"
    )
    print(
        f"  entries whose sign differs (their first AdamW update flips): {(exact.sign() != noisy.sign()).double().mean():.4f}"
    )
    print(f"  first update (lr x sign) relative difference: {relative(exact.sign(), noisy.sign()):.4f}")
    by_kind, by_layer = defaultdict(list), defaultdict(list)
    for name in names:
        error = relative(float32[name].double(), bfloat16[name].double())
        by_kind[name.split(".")[-4]].append(error)
        by_layer[int(name.split("layers.")[1].split(".")[0])].append(error)
    print("  relative error by projection: " + ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in by_kind.items()))
    print(
        "  relative error by layer:      "
        + ", ".join(f"{k}: {sum(v) / len(v):.4f}" for k, v in sorted(by_layer.items()))
    )


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        first_step_gradients(sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "chosen", sys.argv[5:])
        return
    overrides = sys.argv[1:]
    term = "chosen" if "--chosen-logps" in overrides else "loss"
    overrides = [arg for arg in overrides if arg != "--chosen-logps"]
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for dtype in ("float32", "bfloat16"):
            saved[dtype] = Path(tmp) / f"{dtype}.pt"
            command = [sys.executable, __file__, "--child", dtype, str(saved[dtype]), term, *overrides]
            subprocess.run(command, cwd=REPO, check=True)
        report(torch.load(saved["float32"]), torch.load(saved["bfloat16"]))


if __name__ == "__main__":
    main()
