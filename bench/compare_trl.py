"""dpo-lora against TRL's DPOTrainer (with PEFT) on the same work, side by side in one run.

    python bench/compare_trl.py [--workload short|long] [--steps N] [--systems trl,dpo-lora,...]
                                [--dtype float32|bfloat16|both]

Same model (SmolLM2-135M-Instruct in NF4), LoRA (r=16, all linear layers), data, micro batch,
max_length, gradient checkpointing and dtype for every system; each runs in its own process so
its peak RSS is its own. The data is one epoch of the run. Prints steady-state s/step (median after
the first two steps, plus any up-front reference precompute divided by the steps), pairs/s,
tokens/s, peak RSS and ratios to TRL, and dpo-lora's achieved FLOP/s against this machine's
measured matmul rate. The header names the machine's bf16 capability: on a CPU without
AVX512-BF16 or AMX, bfloat16 is emulated and every system is slow alike. Results go to
bench/results/WORKLOAD-DTYPE-TIMESTAMP.json.
TRL is a bench-only extra: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The systems: TRL as its users run it, "trl-lowmem" and "trl-thp" (below), and dpo-lora as shipped
# ("dpo-lora": shared prompt with split attention, chunked log-probs, `dpo.reference: auto`, which
# precomputes on this one-epoch run, gradient checkpointing) or changed by "-"-joined MODIFIERS:
# "dpo-lora-nockpt-allbf16" is as shipped without checkpointing and without the float32 residual.
# Every dpo-lora variant puts large CPU tensors on huge pages, as its CLI does; "trl-thp" is TRL
# given the same (torch's THP_MEM_ALLOC_ENABLE), which TRL does not set itself. "-lowmem" gives
# either trainer a fixed malloc mmap threshold (dpo_lora.core.cpu_memory; CPU only).
SYSTEMS = (
    "trl", "dpo-lora-plain", "dpo-lora-unshared", "dpo-lora", "dpo-lora-online", "dpo-lora-mask",
    "trl-lowmem", "dpo-lora-lowmem", "trl-thp", "dpo-lora-allbf16", "dpo-lora-nockpt", "dpo-lora-auto",
    "dpo-lora-fused", "dpo-lora-fused-bf16lora", "trl-dora", "dpo-lora-dora",
)  # fmt: skip
LOWMEM_MB = 4
SHIPPED = {
    "dpo.reference": "auto", "train.share_prompt": "true", "train.shared_prompt_attention": "split",
    "train.logps_chunk_size": "1024", "train.cpu_mmap_threshold_mb": "0", "model.float32_residual": "auto",
    "model.gradient_checkpointing": "true", "model.checkpoint_layers": "all", "model.fused_lora": "false",
    "model.lora_matmul_dtype": "float32", "model.compile": "off",
}  # fmt: skip
MODIFIERS = {
    # the unoptimized path: full logits, no prompt sharing, online reference
    "plain": {"dpo.reference": "online", "train.share_prompt": "false", "train.logps_chunk_size": "0"},
    "unshared": {"dpo.reference": "online", "train.share_prompt": "false"},  # chunked, online reference
    "online": {"dpo.reference": "online"},
    "mask": {"train.shared_prompt_attention": "mask"},  # the dense 4D mask instead of split attention
    "flex": {"train.shared_prompt_attention": "flex"},  # one FlexAttention call a layer (CUDA; elsewhere split)
    "lowmem": {"train.cpu_mmap_threshold_mb": str(LOWMEM_MB)},
    # bf16 runs: all bf16, or the float32 residual stream and head (auto: all bf16 on a GPU, f32res on a CPU)
    "allbf16": {"model.float32_residual": "false"},
    "f32res": {"model.float32_residual": "true"},
    # without recompute (every other system checkpoints): the memory dpo-lora saves spent on speed,
    # to compare at TRL's memory rather than at its settings; "-ckptK" checkpoints the first K layers
    "nockpt": {"model.gradient_checkpointing": "false"},
    "auto": {"model.checkpoint_layers": "auto"},  # on a GPU, what the card needs; on a CPU, every layer
    "fused": {"model.fused_lora": "true"},  # each 4-bit LoRA linear as one autograd function
    "offload": {"model.offload_activations": "true"},  # checkpointed layer inputs in pinned host memory
    "bf16lora": {"model.lora_matmul_dtype": "bfloat16"},  # with -fused in all bf16: the adapter's products in bf16
    "compile": {"model.compile": "layers"},  # each decoder layer compiled (the first steps pay the compile)
    "zero0": {"deepspeed": "deepspeed_configs/zero0.json"},  # DeepSpeed without ZeRO (every other: zero2.json)
    "dora": {"lora.dora": "true"},  # DoRA (PEFT's), against "trl-dora": TRL with PEFT's use_dora
}


def dpo_lora_settings(system: str) -> dict[str, str]:
    """The config keys a dpo-lora system name sets: SHIPPED changed by each of its modifiers."""
    settings = dict(SHIPPED)
    for modifier in system.removeprefix("dpo-lora").split("-")[1:]:
        if modifier.startswith("ckpt") and modifier[4:].isdigit():
            settings["model.checkpoint_layers"] = modifier[4:]
        elif modifier in MODIFIERS:
            settings.update(MODIFIERS[modifier])
        else:
            raise SystemExit(
                f"--systems: {system!r} has no modifier {modifier!r} (known: {', '.join(MODIFIERS)}, ckptK)"
            )
    return settings


# (prompt tokens, completion tokens, micro batch, max_length), as in the peer figures.
WORKLOADS = {"short": (64, 60, 4, 256), "long": (300, 480, 2, 1024)}


def make_pairs(tokenizer, prompt_tokens: int, completion_tokens: int, count: int, seed: int = 0) -> list[dict]:
    """Pairs of the workload's lengths cut from the bundled sentiment data (no download)."""
    import random

    rows = [json.loads(line) for line in (REPO / "data/sentiment/train.jsonl").read_text().splitlines()]
    text = " ".join(m["content"] for row in rows for m in row["prompt"] + row["chosen"] + row["rejected"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def piece(n: int) -> str:
        start = rng.randrange(0, len(ids) - n)
        return tokenizer.decode(ids[start : start + n])

    return [
        {
            "prompt": piece(prompt_tokens),
            "chosen": " " + piece(completion_tokens),
            "rejected": " " + piece(completion_tokens),
        }
        for _ in range(count)
    ]


def run_trl(args, data_file: Path, work: Path) -> list[float]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = getattr(torch, args.dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    _, _, micro_batch, max_length = WORKLOADS[args.workload]
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        max_length=max_length, gradient_checkpointing=True, bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_dropout=True,
    )  # fmt: skip
    dora = "dora" in args.child.split("-")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora)  # fmt: skip
    times = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    dataset = load_dataset("json", data_files=str(data_file), split="train")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
        callbacks=[StepTimes()],
    )  # fmt: skip
    trainer.train()
    return times


def write_epoch(args, tokenizer, data_file: Path) -> None:
    """One epoch of the workload's pairs: the run sees every pair once, as `train.epochs: 1` does."""
    prompt_tokens, completion_tokens, micro_batch, _ = WORKLOADS[args.workload]
    pairs = make_pairs(tokenizer, prompt_tokens, completion_tokens, count=micro_batch * args.steps)
    data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))


def workload_overrides(args, data_file: Path, output_dir: Path) -> list[str]:
    """dpo-lora's config for the workload, on top of configs/demo.yaml: what every system shares."""
    prompt_tokens, _, micro_batch, max_length = WORKLOADS[args.workload]
    return [
        f"model.path={args.model}", f"model.dtype={args.dtype}", "model.gradient_checkpointing=true",
        "lora.dropout=0.0", f"data.train={data_file}", "data.eval=null", f"data.max_length={max_length}",
        f"data.max_prompt_length={min(max_length - 1, 2 * prompt_tokens)}", f"train.micro_batch_size={micro_batch}",
        "train.grad_accum=1", f"train.max_steps={args.steps}", "train.scheduler=constant", "train.warmup_ratio=0",
        f"output_dir={output_dir}", "overwrite=true",
    ]  # fmt: skip


def run_dpo_lora(args, data_file: Path, work: Path, system: str) -> tuple[list[float], list[float], list[float]]:
    """(seconds per step, loss per step, seconds of reference precompute) of one dpo-lora variant."""
    from dpo_lora.core.config import load_config
    from dpo_lora.train.loop import train

    settings = [f"{key}={value}" for key, value in dpo_lora_settings(system).items()]
    config = load_config(
        REPO / "configs/demo.yaml",
        [*workload_overrides(args, data_file, work / system), "train.log_every=1", *settings],
    )
    os.environ["DPO_LORA_CACHE"] = str(work / system / "cache")  # a cold cache: the precompute is paid in this run
    precompute_s = time_precompute()
    train(config)
    rows = [json.loads(line) for line in (work / system / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "pairs_per_s" in row]
    return [row["global_batch"] / row["pairs_per_s"] for row in rows], [row["loss"] for row in rows], precompute_s


def time_precompute() -> list[float]:
    """Seconds the run spends precomputing reference log-probs up front (empty list: none), which
    the steady-state step time does not show and the table spreads over the run's steps."""
    from dpo_lora.train import setup as run_setup

    seconds, precomputed = [], run_setup._precomputed

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return precomputed(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    run_setup._precomputed = timed
    return seconds


def child(args) -> None:
    """One system in this process; writes its step times, losses, wall time and peak RSS as JSON."""
    work = Path(args.work)
    started = time.perf_counter()
    losses, precompute_s = None, []
    if args.child.startswith("trl"):
        if args.child.endswith("lowmem"):
            from dpo_lora.core.cpu_memory import cap_heap_fragmentation

            cap_heap_fragmentation(LOWMEM_MB)
        times = run_trl(args, Path(args.data), work)
    else:
        times, losses, precompute_s = run_dpo_lora(args, Path(args.data), work, args.child)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"step_times": times, "wall_s": time.perf_counter() - started, "peak_rss_gb": peak_kb / 2**20}
    result["peak_gpu_gb"] = gpu_peak_gb()
    result["losses"], result["precompute_s"] = losses, sum(precompute_s)
    Path(args.result).write_text(json.dumps(result))


def gpu_peak_gb() -> float | None:
    """The CUDA allocator's peak in this process (None without a GPU): on a GPU the memory that
    matters, where the process's RSS is mostly the CUDA runtime."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def matmul_flops(dtype_name: str) -> float:
    """This machine's dense matmul rate (FLOP/s) in the training dtype, on the device the systems
    train on, as the quote measures it: the faster of the two operand layouts (on a CPU without
    native bf16 they differ ~8x in bf16: bench/matmul_layouts.py)."""
    import torch

    from dpo_lora.model.quote import measure_matmul_rate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return measure_matmul_rate(device, getattr(torch, dtype_name))


def forward_flops_per_token(model_path: str) -> tuple[float, float]:
    """(decoder layers, LM head): one token's forward matmul FLOPs, 2 x the weights it passes."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    per_layer = 4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
    per_layer += 3 * c.hidden_size * c.intermediate_size
    return 2 * c.num_hidden_layers * per_layer, 2 * c.hidden_size * c.vocab_size


def useful_flops_per_token(model_path: str) -> float:
    """4 x parameters per token: the policy's forward (2N) and its backward through the frozen base
    to the adapter (2N, no weight gradients); recomputation, the reference pass and the prompt's
    second copy are not counted, because removing them is what an efficient trainer does."""
    layers, head = forward_flops_per_token(model_path)
    return 2 * (layers + head)


def matmul_flops_per_pair(model_path: str, workload: str) -> dict[str, float]:
    """One pair's matmul FLOPs in a one-epoch run with gradient checkpointing, by what each system
    runs (attention's score matmuls left out). Per token, the layers cost 4 forwards (the reference
    forward, the policy forward, its recompute, the backward to the adapter), the head 3 (no recompute).
    - TRL: two rows of prompt + completion; a reference forward and the policy, logits at every
      position.
    - dpo-lora: one row of prompt + both completions; the reference once (precomputed: one forward
      per pair and epoch); the head only at completion positions, its gradient a second matmul in
      the forward, none in the backward.
    Where matmuls decide the step, TRL's figure over dpo-lora's caps the speed ratio."""
    layers, head = forward_flops_per_token(model_path)
    prompt_tokens, completion_tokens, _, _ = WORKLOADS[workload]
    trl_tokens = 2 * (prompt_tokens + completion_tokens)
    shared_tokens, scored_tokens = prompt_tokens + 2 * completion_tokens, 2 * completion_tokens
    return {
        "trl": trl_tokens * (4 * layers + 3 * head),
        "dpo-lora": shared_tokens * 4 * layers + scored_tokens * 3 * head,
    }


def cpu_flags() -> str:
    """The CPU's SIMD flags that decide matmul speed (lscpu's names), e.g. "avx2 avx512_bf16"."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(flag for flag in wanted if flag in flags.split())


def bf16_capability() -> str:
    """One line: how this machine runs bfloat16."""
    import torch

    if torch.cuda.is_available():
        return f"bf16: native ({torch.cuda.get_device_name()})"
    from dpo_lora.model.precision import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return "bf16: native on this CPU (AVX512-BF16 or AMX)"
    return "bf16: EMULATED on this CPU (no AVX512-BF16 or AMX): bfloat16 runs are slow for every system alike"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default 8 short, 4 long)")
    parser.add_argument(
        "--systems",
        default=",".join(s for s in SYSTEMS if s != "dpo-lora-auto"),  # the same run as dpo-lora but on a GPU
        help=f"comma-separated, from {SYSTEMS}, or dpo-lora with any '-'-joined modifiers of {(*MODIFIERS, 'ckptK')}",
    )
    parser.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "both"), default=None,
        help="the dtype every system runs in (default: bfloat16 where native, else float32)",
    )  # fmt: skip
    for hidden in ("--child", "--data", "--work", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for system in args.systems.split(","):
        if system.startswith("dpo-lora"):
            dpo_lora_settings(system)  # an unknown modifier stops here, not after the other systems ran
        elif system not in SYSTEMS:
            parser.error(f"--systems: unknown system {system!r}")
    if args.child and (args.child.startswith("dpo-lora") or args.child == "trl-thp"):
        from dpo_lora.core.cpu_memory import huge_pages_for_tensors

        huge_pages_for_tensors()  # as `dpo-lora train` does, before anything imports torch
    if args.steps is None:
        args.steps = 8 if args.workload == "short" else 4
    if args.dtype is None:
        import torch

        from dpo_lora.model.precision import cpu_has_native_bf16

        args.dtype = "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"
    if args.child:
        child(args)
        return
    print(bf16_capability(), flush=True)
    for dtype in ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,):
        run_workload(args, dtype)


def run_workload(args, dtype: str) -> None:
    """Every system on the workload in `dtype`, one process each; prints the table, writes the JSON."""
    from transformers import AutoTokenizer

    prompt_tokens, completion_tokens, micro_batch, _ = WORKLOADS[args.workload]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file = work / "pairs.jsonl"
        write_epoch(args, tokenizer, data_file)
        tokens_per_pair = prompt_tokens * 2 + completion_tokens * 2  # chosen and rejected each carry the prompt
        useful_tokens_per_pair = prompt_tokens + completion_tokens * 2  # the prompt needs to run only once
        results = {}
        for system in args.systems.split(","):
            result_file = work / f"{system}.json"
            command = [sys.executable, __file__, "--child", system, "--workload", args.workload]
            command += ["--steps", str(args.steps), "--model", args.model, "--dtype", dtype]
            command += ["--data", str(data_file), "--work", str(work), "--result", str(result_file)]
            print(f"running {system} ({dtype}) ...", flush=True)
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{system} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(result_file.read_text())
            # Steady state, plus any up-front reference precompute spread over the run's steps.
            steady = statistics.median(result["step_times"][2:] or result["step_times"])
            steady += result.get("precompute_s", 0.0) / args.steps
            result.update(s_per_step=steady, pairs_per_s=micro_batch / steady)
            result["tokens_per_s"] = result["pairs_per_s"] * tokens_per_pair
            results[system] = result

    peak = matmul_flops(dtype)
    flops_per_token = useful_flops_per_token(args.model)
    trl = results.get("trl")

    def peer(system: str) -> dict | None:  # DoRA runs against TRL with DoRA, where it ran
        return results.get("trl-dora") if "dora" in system.split("-") and "trl-dora" in results else trl

    print(
        f"\nworkload {args.workload}: {micro_batch} pairs/step, ~{tokens_per_pair} tokens/pair, {dtype}, {args.steps} steps\n"
        f"{bf16_capability()}; CPU flags: {cpu_flags()}"
    )
    # On a GPU the device allocator's peak is the memory that decides what fits; on a CPU, RSS.
    on_gpu = any(r["peak_gpu_gb"] is not None for r in results.values())
    memory_key, memory_name = ("peak_gpu_gb", "GPU") if on_gpu else ("peak_rss_gb", "RSS")
    print(
        f"{'system':<22}{'s/step':>8}{'pairs/s':>9}{'tokens/s':>10}{'peak ' + memory_name:>10}{'wall s':>8}"
        f"{'x TRL speed':>13}{'x TRL ' + memory_name:>11}"
    )
    for system, r in results.items():
        base = peer(system)
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if base else "-"
        memory = f"{r[memory_key] / base[memory_key]:.2f}" if base else "-"
        print(
            f"{system:<22}{r['s_per_step']:>8.3f}{r['pairs_per_s']:>9.3f}{r['tokens_per_s']:>10.1f}"
            f"{r[memory_key]:>9.2f}G{r['wall_s']:>8.0f}{speed:>13}{memory:>11}"
        )
        r["useful_flops_per_s"] = r["pairs_per_s"] * useful_tokens_per_pair * flops_per_token
    print(f"machine matmul rate ({dtype}): {peak / 1e9:.1f} GFLOP/s")
    for system, r in results.items():
        print(
            f"{system}: {r['useful_flops_per_s'] / 1e9:.2f} useful GFLOP/s = {r['useful_flops_per_s'] / peak:.1%} of it"
        )
    work = matmul_flops_per_pair(args.model, args.workload)
    print(
        f"matmul work per pair: TRL {work['trl'] / 1e9:.1f} GFLOP, dpo-lora {work['dpo-lora'] / 1e9:.1f} GFLOP: "
        f"where matmuls bound the step, dpo-lora's pairs/s is at most {work['trl'] / work['dpo-lora']:.2f}x TRL's"
    )
    plain = results.get("dpo-lora-plain")
    for system, r in results.items():
        if plain and r["losses"] and system != "dpo-lora-plain":
            r["max_loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(r["losses"], plain["losses"], strict=True))
            print(f"{system}: per-step losses within {r['max_loss_diff_vs_plain']:.1e} of dpo-lora-plain")
    out = REPO / "bench/results" / f"{args.workload}-{dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "workload": args.workload,
        "dtype": dtype,
        "bf16": bf16_capability(),
        "cpu_flags": cpu_flags(),
        "steps": args.steps,
        "matmul_flops": peak,
        "matmul_flops_per_pair": work,
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
