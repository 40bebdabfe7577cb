"""Device ops dispatched per training step, dpo-lora against TRL: a GPU's kernel launches, counted on a CPU.

    python bench/op_counts.py [--geometry llama2-7b] [--settings long-mb4,long-mb8,long-prompt-mb4]
                              [--systems trl,trl-precompute,dpo-lora,dpo-lora-fused,...] [--dtype bfloat16]
                              [--sites _to_copy,copy_,clone]

At 7B and a few pairs a step both trainers are launch-bound on an H200 (docs/performance.md: the GPU
busy 4-10% of the step, ~12,000 kernels a step), so there the system that dispatches fewer ops is the
faster one. Which ops a step dispatches depends on the model's structure (layers, attention grouping),
the workload's lengths and micro-batch, and the trainer, not on the layers' width. So this counts them
on the CPU, for a model with the geometry's layers, attention grouping and vocabulary at a width of
256 (random weights), at the workload's real lengths: a device-free measure of launch overhead.

Counted by bench/gpu_regimes.py's OpCount (torch's dispatch mode: each op after autograd, views and
allocations left out) over one step after a warm-up one. An up-front reference precompute
(dpo-lora's `dpo.reference: auto`, TRL's `precompute_ref_log_probs`) is counted too and spread over
the run's steps, as its time is in the speed benchmarks. Reported apart: the optimizer's ops (on the
CPU they run per tensor, on CUDA fused or foreach, so they do not carry over) and the ops of torch's
lower-right causal masks, which the CPU materialises for split attention's rejected rows and CUDA's
flash kernel takes natively. Not the same as a GPU's kernel count: one op can launch several
kernels (bitsandbytes' gemm_4bit at training sizes: two dequantizations and a GEMM; cuBLAS; SDPA's
backward), and CUDA-only paths (FlexAttention, which runs split here) are not counted.
`--sites OP,...` also counts where the step asks for those ops (the innermost two Python frames
outside torch: `_to_copy @ tuners_utils.py:2235:_cast_input_dtype <- bnb.py:546:forward`; ops run by
autograd's backward show the `.backward()` call) and prints the busiest sites per system.
Results go to bench/results/ops-GEOMETRY-TIMESTAMP.json. TRL is the bench extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402
import gpu_regimes  # noqa: E402

REPO = compare_trl.REPO
NARROW = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4)  # width only: the ops stay


def narrow_geometry(name: str) -> dict:
    """The geometry's layers, attention grouping and vocabulary at a width of 256."""
    from scale import GEOMETRIES

    geometry = GEOMETRIES[name]
    grouping = geometry["num_attention_heads"] // geometry["num_key_value_heads"]
    return {**geometry, **NARROW, "num_key_value_heads": NARROW["num_attention_heads"] // grouping}


def prepare_model(name: str) -> Path:
    from scale import write_model, write_tokenizer

    model = REPO / "runs" / "op-counts" / name
    if not (model / "model.safetensors.index.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        write_tokenizer(model)
        write_model(model, narrow_geometry(name), "cpu")
    return model


def count(system: str, setting: str, model: Path, dtype: str, work: Path, sites: list[str]) -> dict:
    """One system's counted step at one setting ("long-mb4"), in its own process."""
    workload, micro_batch = setting.rsplit("-mb", 1)
    prompt, completion, max_length = gpu_regimes.WORKLOADS[workload]
    spec = {
        "system": system, "model": str(model), "dtype": dtype, "work": str(work), "prompt": prompt,
        "completion": completion, "max_length": max_length, "micro_batch": int(micro_batch), "warmup": 1,
        "total_steps": 2, "cap_gb": None, "probe": "ops", "sites": sites,
    }  # fmt: skip
    spec_file = work / f"spec-{system}-{setting}.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_regimes.py"), "--child", str(spec_file)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": done.stderr[-800:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "ops" not in result:
        return {"error": result.get("error", "no count")}
    # The up-front pass covered the run's pairs: one step's share of it
    steps = spec["total_steps"]
    result["upfront_ops_per_step"] = result.get("upfront_ops", 0) / steps
    result["ops_per_step"] = result["ops"] + result["upfront_ops_per_step"]
    result["cpu_only_ops_per_step"] = result["cpu_only_ops"] + result.get("upfront_cpu_only_ops", 0) / steps
    return {key: result[key] for key in result if key not in ("step_times",)}


def report(results: dict, settings: list[str]) -> None:
    print(
        f"{'setting':<17}{'system':<22}{'ops/step':>10}{'of which up-front':>19}{'x TRL':>7}"
        f"{'optimizer (CPU)':>17}{'masks (CPU only)':>18}"
    )
    for setting in settings:
        trl = results.get("trl", {}).get(setting, {}).get("ops_per_step")
        for system, by_setting in results.items():
            r = by_setting[setting]
            if "error" in r:
                print(f"{setting:<17}{system:<22}  {r['error'].strip().splitlines()[-1][:90]}")
                continue
            ratio = f"{r['ops_per_step'] / trl:.2f}" if trl else "-"
            print(
                f"{setting:<17}{system:<22}{r['ops_per_step']:>10.0f}{r['upfront_ops_per_step']:>19.0f}"
                f"{ratio:>7}{r['optimizer_ops']:>17}{r['cpu_only_ops_per_step']:>18.0f}"
            )
    print("\nthe most dispatched ops in one step (first setting), per system:")
    for system, by_setting in results.items():
        named = by_setting[settings[0]].get("ops_by_name", {})
        top = ", ".join(f"{name.split('::')[1]} {n}" for name, n in list(named.items())[:8])
        print(f"  {system}: {top}")
    for system, by_setting in results.items():
        sites = by_setting[settings[0]].get("sites_by_name", {})
        if sites:
            print(f"\nwhere {system} asks for {', '.join(sorted({s.split(' @ ')[0] for s in sites}))} (first setting):")
            for site, n in list(sites.items())[:12]:
                print(f"  {n:>6}  {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", default="llama2-7b", help="a bench/scale.py geometry (its layers, not its width)")
    parser.add_argument("--settings", default="long-mb4,long-mb8,long-prompt-mb4")
    parser.add_argument("--systems", default="trl,trl-precompute,dpo-lora,dpo-lora-fused,dpo-lora-mask")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sites", default="", help="comma-separated op names whose call sites are counted")
    args = parser.parse_args()
    settings, systems = args.settings.split(","), args.systems.split(",")
    for system in systems:
        if system.startswith("dpo-lora"):
            compare_trl.dpo_lora_settings(system)  # an unknown modifier stops here, before any run
    import torch

    model = prepare_model(args.geometry)
    print(f"{args.geometry}'s layers at width 256, {args.dtype}, on the CPU ({compare_trl.cpu_flags()})", flush=True)
    results: dict = {system: {} for system in systems}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            for system in systems:
                started = time.perf_counter()
                sites = [name for name in args.sites.split(",") if name]
                results[system][setting] = count(system, setting, model, args.dtype, Path(tmp), sites)
                print(f"  {system} {setting}: {time.perf_counter() - started:.0f} s", flush=True)
    report(results, settings)
    out = REPO / "bench/results" / f"ops-{args.geometry}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "geometry": args.geometry, "narrowed_to": NARROW, "dtype": args.dtype, "torch": torch.__version__,
        "cpu": compare_trl.cpu_flags(), "results": results,
    }, indent=2))  # fmt: skip
    print(f"written {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
