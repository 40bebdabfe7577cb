"""What each ZeRO-3 rank holds while loading an NF4 base: one rank, two ranks, and the whole load.

    python bench/zero3_loading.py [--work DIR] [--layers 16]

Writes a random-weight Llama (hidden 2048, intermediate 5632, vocab 8000, `--layers` layers;
bfloat16 safetensors), then loads it as NF4 (storage and compute dtype bfloat16; loading only,
no compute) in three ways, each in fresh processes:
- `partitioned`, 1 rank and 2 ranks: dpo-lora's ZeRO-3 loader (`dpo_lora/model/zero3_loading.py`);
- `whole`, 2 ranks: `from_pretrained` on every rank, then ZeRO-3 partitioning, as
  `deepspeed.initialize` does it (dpo-lora's path before the loader, and transformers' for every
  quantized model).
Per rank, above what it held before loading: peak RSS during the load (VmHWM, reset just before
it) and peak anonymous memory (RssAnon, sampled every 10 ms: mmapped safetensors pages count in
RSS but are page cache); and the parameter bytes it holds afterwards. Results: bench/results/zero3-loading-TIMESTAMP.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Layers dominate the base, as in a real 7B-70B (a small vocabulary: the bf16 embedding and head
# are not quantized, and at 32000 x 2048 they would outweigh a few 4-bit layers).
GEOMETRY = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                vocab_size=8000, rope_theta=10000.0)  # fmt: skip
MiB = 2**20


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def worker(model_dir: str, mode: str, out: str) -> None:
    """One rank: load, measure, write this rank's JSON row."""
    import accelerate  # noqa: F401 - every import the load needs, before the baseline
    import bitsandbytes  # noqa: F401
    import deepspeed
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from dpo_lora.core.cpu_memory import cap_heap_fragmentation
    from dpo_lora.core.distributed import init_distributed
    from dpo_lora.core.schema import ModelConfig, TrainConfig
    from dpo_lora.model.load import load_base
    from dpo_lora.model.zero3_loading import held_bytes

    dist = init_distributed()
    cap_heap_fragmentation(TrainConfig().cpu_mmap_threshold_mb)  # as the trainer does on the CPU
    world = dist.world_size
    ds_config = json.loads((REPO / "deepspeed_configs/zero3.json").read_text())
    ds_config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        train_batch_size=world,
        gradient_clipping=1.0,
        bf16={"enabled": False},
        fp16={"enabled": False},
    )  # as the trainer fills it
    model_config = ModelConfig(path=model_dir, quantization="nf4", dtype="bfloat16")
    deepspeed.comm.barrier()
    before = status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    anon_before = status_kib("RssAnon")
    peak_anon = [anon_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak_anon[0] = max(peak_anon[0], status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if mode == "partitioned":
        model = load_base(model_config, dist.device, ds_config)
    else:
        model = load_base(model_config, dist.device)
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)  # what deepspeed.initialize does
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    held = held_bytes(model)
    row = {
        "mode": mode, "rank": dist.rank, "world_size": world, "seconds": round(seconds, 1),
        "rss_before_mib": before / MiB, "peak_rss_mib": status_kib("VmHWM") / 1024,
        "peak_rss_during_load_mib": status_kib("VmHWM") / 1024 - before / MiB,
        "peak_anon_during_load_mib": (peak_anon[0] - anon_before) / 1024, "held_mib": held.partition / MiB, "whole_mib": held.whole / MiB,
        "quant_stats_mib": held.quant_stats / MiB,
    }  # fmt: skip
    Path(f"{out}.rank{dist.rank}").write_text(json.dumps(row))
    deepspeed.comm.barrier()


def launch(model_dir: Path, mode: str, ranks: int, out: Path) -> list[dict]:
    me = [str(Path(__file__).resolve()), "--worker", "--model", str(model_dir), "--mode", mode, "--out", str(out)]
    if ranks == 1:
        command = [sys.executable, *me]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        command = [deepspeed, "--num_gpus", str(ranks), "--master_port", "29655", "--no_local_rank", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{mode} on {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/dpo-lora-zero3-bench")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model, args.mode, args.out)

    from scale import write_model, write_tokenizer

    work = Path(args.work)
    model_dir = work / f"llama-2048x{args.layers}"
    if not (model_dir / "model.safetensors.index.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        write_tokenizer(model_dir)
        write_model(model_dir, {**GEOMETRY, "num_hidden_layers": args.layers})
    file_mib = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / MiB
    rows = []
    for mode, ranks in (("partitioned", 1), ("partitioned", 2), ("whole", 2)):
        rows += launch(model_dir, mode, ranks, work / f"{mode}-{ranks}")
    print_report(rows, file_mib, args.layers)


def print_report(rows: list[dict], file_mib: float, layers: int) -> None:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    model = re.search(r"Model name:\s+(.*)", flags)
    lines = [
        f"# ZeRO-3 loading of an NF4 base: Llama hidden 2048 x {layers} layers, vocab 8000 ({file_mib:.0f} MiB "
        "of bf16 safetensors)",
        "",
        f"CPU: {model[1] if model else '?'} ({os.cpu_count()} cores; native bf16: {'yes' if bf16 else 'no'}); "
        "storage and compute dtype bfloat16 (loading only: no compute).",
        "",
        "| mode | ranks | rank | load s | peak RSS during load MiB | peak RssAnon during load MiB | params held MiB | of MiB | quant stats MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['rank']} | {r['seconds']} | {r['peak_rss_during_load_mib']:.0f} | "
            f"{r['peak_anon_during_load_mib']:.0f} | {r['held_mib']:.1f} | {r['whole_mib']:.1f} | {r['quant_stats_mib']:.1f} |"
        )
    one = next(r for r in rows if r["world_size"] == 1)
    two = [r for r in rows if r["mode"] == "partitioned" and r["world_size"] == 2]
    whole = [r for r in rows if r["mode"] == "whole"]
    lines += [
        "",
        f"Params held per rank, 2 ranks / 1 rank: {max(r['held_mib'] for r in two) / one['held_mib']:.3f}",
        "Peak RSS during load per rank, 2 ranks / 1 rank: "
        f"{max(r['peak_rss_during_load_mib'] for r in two) / one['peak_rss_during_load_mib']:.3f}",
        "Peak RSS during load per rank, partitioned / whole (2 ranks): "
        f"{max(r['peak_rss_during_load_mib'] for r in two) / max(r['peak_rss_during_load_mib'] for r in whole):.3f}",
    ]
    report = "\n".join(lines)
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = REPO / "bench" / "results"
    (results / f"zero3-loading-{stamp}.md").write_text(report + "\n")
    (results / f"zero3-loading-{stamp}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
