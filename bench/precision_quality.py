"""Does an all-bf16 policy train as well as the float32-residual one? Issue 36's quality gate for
turning `model.float32_residual` off on GPUs: on the bundled sentiment task, the held-out mean
reward of the bf16 policy within 0.02 of the float32-residual policy's, at the same KL +-10%.

    python bench/precision_quality.py [--seeds 0,1,2] [--n 4] [--candidates all-bf16,all-bf16-fused] [--dry-run]

Each policy trains the demo (configs/demo.yaml: SmolLM2-135M-Instruct in NF4, 10 steps of 8 pairs)
in bfloat16 with `model.float32_residual` true and false, once per seed; then `dpo-lora generate`
samples the 61 held-out prompts `--n` times from the policy and the reference and the task's judge
scores them (as bench/methods.py does). One sample per prompt leaves each mean reward uncertain by
about +-0.05, so the gate reads the mean over seeds and samples. It prints the standard error of
the gap from the per-seed gaps too: a seed fixes the data order and the initialisation, so each
seed's two policies are a pair.
Run it where bf16 is native (a GPU, or a CPU with AVX512-BF16/AMX): on other CPUs bitsandbytes'
bf16 backward is ~30x slower. `--dry-run`: float32 (where the two policies are the same run), 2
steps, one seed, to check the script. `--candidates all-bf16-fused` holds all bf16 with
`model.fused_lora` (whose adapter's second product rounds to bf16) to the same gate, and
`all-bf16-fused-bf16lora` that with both of the adapter's products in bf16
(`model.lora_matmul_dtype`); several candidates share one float32-residual run per seed.
Writes bench/results/precision-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICIES = {
    "float32-residual": ["model.float32_residual=true"],
    "all-bf16": ["model.float32_residual=false"],
    "all-bf16-fused": ["model.float32_residual=false", "model.fused_lora=true"],
    "all-bf16-fused-bf16lora": [
        "model.float32_residual=false",
        "model.fused_lora=true",
        "model.lora_matmul_dtype=bfloat16",
    ],
}


def run(policy: str, seed: int, args, work: Path) -> dict:
    out = work / f"{policy}-{seed}"
    overrides = [
        *POLICIES[policy],
        f"model.dtype={args.dtype}",
        f"train.seed={seed}",
        f"output_dir={out}",
        "overwrite=true",
    ]
    if args.dry_run:
        overrides.append("train.max_steps=2")
    cli = [sys.executable, "-m", "dpo_lora"]
    started = time.perf_counter()
    for command in (
        ["train", "configs/demo.yaml", *overrides],
        ["generate", str(out), "--prompts", "data/sentiment/eval.jsonl", "--n", str(args.n), "--max-new-tokens", "32",
         "--batch-size", "64", "--seed", str(seed), "--reward", "data.sentiment_scorer:score", "--out", str(out / "generations.json")],
    ):  # fmt: skip
        done = subprocess.run([*cli, *command], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{policy} seed {seed}: dpo-lora {command[0]} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "generations.json").read_text())["summary"]
    row = {"policy": policy, "seed": seed, **summary, "seconds": time.perf_counter() - started}
    print(f"{policy:<17} seed {seed}: reward {row['policy_mean_reward']:.3f}, KL {row['kl_estimate']:.3f}", flush=True)
    return row


def stderr(values: list[float]) -> float | None:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


def verdict(rows: list[dict], candidate: str = "all-bf16") -> dict:
    """Mean reward and KL per policy over seeds, the gap's standard error from the per-seed gaps,
    and whether the gate holds for `candidate`."""
    by = {}
    for policy in ("float32-residual", candidate):
        rewards = {r["seed"]: r["policy_mean_reward"] for r in rows if r["policy"] == policy}
        kls = [r["kl_estimate"] for r in rows if r["policy"] == policy]
        by[policy] = {"reward": statistics.mean(rewards.values()), "reward_stderr": stderr(list(rewards.values())),
                      "kl": statistics.mean(kls), "rewards_by_seed": rewards}  # fmt: skip
    reference, bf16 = by["float32-residual"], by[candidate]
    reward_gap = bf16["reward"] - reference["reward"]
    gaps = [bf16["rewards_by_seed"][seed] - reward for seed, reward in reference["rewards_by_seed"].items()]
    kl_ratio = bf16["kl"] / reference["kl"] if reference["kl"] else None
    holds = abs(reward_gap) <= 0.02 and kl_ratio is not None and abs(kl_ratio - 1) <= 0.10
    return {"by_policy": by, "reward_gap": reward_gap, "reward_gap_stderr": stderr(gaps), "kl_ratio": kl_ratio,
            "gate_holds": holds}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--candidates", default="all-bf16", help=f"comma-separated, of {list(POLICIES)[1:]}")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    args.dtype = "float32" if args.dry_run else "bfloat16"
    candidates = args.candidates.split(",")
    for candidate in candidates:
        if candidate not in POLICIES or candidate == "float32-residual":
            parser.error(f"--candidates: {candidate!r} is not one of {list(POLICIES)[1:]}")
    seeds = [0] if args.dry_run else [int(s) for s in args.seeds.split(",")]
    import torch

    from dpo_lora.model.precision import cpu_has_native_bf16

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        "CPU, native bf16" if cpu_has_native_bf16() else "CPU, bf16 EMULATED (slow)")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds:
            for policy in ("float32-residual", *candidates):
                rows.append(run(policy, seed, args, Path(scratch)))
    verdicts = {candidate: verdict(rows, candidate) for candidate in candidates}
    for candidate, result in verdicts.items():
        error = result["reward_gap_stderr"]
        print(
            f"{machine}, {args.dtype}: reward gap ({candidate} - float32-residual) {result['reward_gap']:+.4f}"
            f"{f' (+-{error:.4f} from the per-seed gaps)' if error is not None else ''}, "
            f"KL ratio {result['kl_ratio']:.3f}: the gate (|gap| <= 0.02, KL within 10%) "
            f"{'holds' if result['gate_holds'] else 'does not hold'}"
        )
    out = REPO / "bench" / "results" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(
        {"machine": machine, "dtype": args.dtype, "n": args.n, "seeds": seeds, "rows": rows, "verdicts": verdicts},
        indent=2,
    ))  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
