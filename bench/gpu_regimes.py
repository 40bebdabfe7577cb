"""dpo-lora against TRL's DPOTrainer on one GPU, in the two regimes users decide by (issue 36).

    python bench/gpu_regimes.py [--geometry llama2-7b] [--regime equal-settings,memory-cap]
                                [--budget-s 510] [--dry-run]

- **equal-settings**: the same settings for every system (NF4, LoRA r16 all-linear, bf16, gradient
  checkpointing): the long workload (300 prompt + 480 per completion tokens, max_length 1024) at
  micro-batch 4 and 8, and a long-prompt one (1,500 + 250, max_length 2048) at micro-batch 4, where
  sharing the prompt matters most. Systems: TRL, TRL with `precompute_ref_log_probs=True`,
  dpo-lora as shipped, with `model.fused_lora=true` (and with the adapter's products in bf16,
  `model.lora_matmul_dtype=bfloat16`), and with `train.shared_prompt_attention=flex` (one
  FlexAttention call a layer instead of split attention's two SDPA calls).
- **memory-cap**: each process capped at `--cap-gb` (24) with
  `torch.cuda.set_per_process_memory_fraction`: an H100/H200 at 24 GB, not a consumer card. Each
  system runs the long workload at its largest micro-batch that fits (dpo-lora: its plan's,
  `dpo_lora.model.fitting.largest_fitting`; TRL: doubling from 1 until out of memory), then finds
  its longest max_length at micro-batch 1 (doubling from 1024, two steps each); last, as the budget
  allows, dpo-lora's with `model.offload_activations=true` (the layer inputs in host memory).

Each measured run: `--warmup` steps (5), one profiled step (torch.profiler: kernels launched and
the fraction of the step's wall time the GPU was busy), then `--steps` (20); medians with their
spread (min-max and interquartile). A reference precompute (dpo-lora's, with a cold cache per run;
TRL's `precompute_ref_log_probs`, which runs while its trainer is built) is timed and spread over
the run's steps. Reported: pairs/s, useful tokens/s (the prompt once per pair),
model FLOP utilisation against this GPU's measured bf16 matmul rate (compare_trl's useful FLOPs:
4 x parameters per token), `max_memory_allocated` and `max_memory_reserved`. Every run is its own
process. Runs go in priority order and a run that would pass `--budget-s` is skipped and recorded
as such, so the script ends within the device's time. Each regime writes
bench/results/gpu-GEOMETRY-REGIME-TIMESTAMP.json: `regime`, `geometry`, `cap_gb` (null without a
cap) and `results: {system: ...}` (equal-settings: by setting, "long-mb4" ...; memory-cap: the
system's largest micro-batch run plus `longest_max_length`).

`--dry-run` checks the script on the CPU: a 2-layer model of the geometry's shape family, 1 warm-up
and 2 measured steps, no cap, no profile of GPU kernels. TRL is the bench extra: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402

REPO = compare_trl.REPO
# (prompt tokens, tokens per completion, max_length)
WORKLOADS = {"long": (300, 480, 1024), "long-prompt": (1500, 250, 2048)}
EQUAL_SETTINGS = [("long", 4), ("long", 8), ("long-prompt", 4)]
# In rounds, so that the budget covers the comparison the targets are about (TRL against dpo-lora
# as shipped, at every setting) before the variants.
EQUAL_ROUNDS = [["trl", "dpo-lora"], ["trl-precompute", "dpo-lora-flex", "dpo-lora-fused", "dpo-lora-fused-bf16lora"]]
EQUAL_SYSTEMS = [system for round_ in EQUAL_ROUNDS for system in round_]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
# intermediate_size a multiple of 32: bitsandbytes' CPU 4-bit inference path (TRL's precompute, no grad)
# asserts it ("N must be divisible by block_n"); 7B's 11008 is one.
DRY_GEOMETRY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0)  # fmt: skip


# ---------------------------------------------------------------- one run (a child process)


def child(spec: dict) -> dict:
    """One system's run of one setting in this process: step times, memory, one profiled step."""
    import torch

    if spec["cap_gb"] and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 2**30 / total))
    work = Path(spec["work"])
    pairs = work / f"pairs-{spec['prompt']}-{spec['completion']}-{spec['micro_batch']}.jsonl"
    if not pairs.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        count = spec["micro_batch"] * spec["total_steps"]
        rows = compare_trl.make_pairs(tokenizer, spec["prompt"], spec["completion"], count)
        pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    profiled: dict = {}
    try:
        if spec["system"].startswith("trl"):
            times, pre_steps_s = trl_run(spec, pairs, profiled)
        else:
            times, pre_steps_s = dpo_lora_run(spec, pairs, profiled)
    except Exception as error:  # noqa: BLE001  (out of memory is a result here, not a failure)
        text = f"{type(error).__name__}: {error}"
        return {"error": text[:500], "oom": "out of memory" in text.lower() or "OutOfMemory" in text}
    result = {"step_times": times, "pre_steps_s": pre_steps_s, **profiled, "oom": False}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        result["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["max_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return result


class OpCount:
    """Counts the device ops dispatched in one step, by name: TorchDispatchMode sees each op once,
    after autograd and below Python (a custom op such as bitsandbytes' dequantize counts once,
    whatever it runs inside). Views and allocations launch nothing and are left out. Each op left is
    at least one kernel launch on a GPU, so on the CPU this is a device-free measure of launch
    overhead (`bench/op_counts.py`)."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
            "lift_fresh", "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
            "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}  # fmt: skip

    def __init__(self, into: dict, prefix: str = "", sites: tuple[str, ...] = ()) -> None:
        self.into, self.prefix = into, prefix  # "upfront_": a reference precompute's ops
        self.sites = sites  # op names whose call sites are counted too (the step's, `sites` below)

    def __enter__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        counts, free, section, sites = collections.Counter(), self.FREE, self.section, self.sites

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not func.is_view and name not in free:
                    where = section[0]
                    if where == "cpu_only" and name.startswith("_scaled_dot_product"):
                        where = "step"  # the attention itself runs on every device
                    counts[where, f"{func.namespace}::{name}"] += 1
                    if where == "step" and name in sites:
                        counts["sites", f"{name} @ {call_site()}"] += 1
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, Mode()
        self.mode.__enter__()
        return self

    # Where the ops being counted belong: "step"; "optimizer" (on the CPU the optimizers run per
    # tensor where CUDA's run fused or foreach: the counts do not carry over); "cpu_only" (torch's
    # lower-right causal masks, materialised on the CPU and taken natively by CUDA's flash kernel).
    SECTIONS = {"step": "ops", "optimizer": "optimizer_ops", "cpu_only": "cpu_only_ops", "sites": "sites"}
    section = ["step"]

    @staticmethod
    def apart(where: str, function):
        """`function` with the ops it dispatches counted in section `where`."""

        @functools.wraps(function)
        def counted(*args, **kwargs):
            outer, OpCount.section[0] = OpCount.section[0], where
            try:
                return function(*args, **kwargs)
            finally:
                OpCount.section[0] = outer

        return counted

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        for section, key in self.SECTIONS.items():
            named = {name: n for (where, name), n in self.counts.most_common() if where == section}
            self.into[f"{self.prefix}{key}"] = sum(named.values())
            self.into[f"{self.prefix}{key}_by_name"] = named


def call_site() -> str:
    """The innermost two Python frames outside torch and this file ("file:line:function <- ..."):
    where an op was asked for. Backward ops show the `.backward()` call that ran them."""
    import traceback

    outside = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(outside[-2:]))


def probe(spec: dict, into: dict):
    """What the measured step runs under: the profiler, or the op count (`spec["probe"] == "ops"`),
    with the call sites of the ops named in `spec["sites"]`."""
    return OpCount(into, sites=tuple(spec.get("sites", ()))) if spec.get("probe") == "ops" else StepProfile(into)


class StepProfile:
    """torch.profiler around one step: kernels launched and the GPU's busy fraction of its wall time."""

    def __init__(self, into: dict) -> None:
        self.into = into

    def __enter__(self):
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self.started) * 1e6
        self.profile.__exit__(*exc)
        if not torch.cuda.is_available():
            self.into.update(kernels_per_step=None, gpu_busy_fraction=None, profiled_step_s=wall_us / 1e6)
            return
        kernels = [e for e in self.profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.end - e.time_range.start for e in kernels)
        self.into.update(
            kernels_per_step=len(kernels), gpu_busy_fraction=busy_us / wall_us, profiled_step_s=wall_us / 1e6
        )


def trl_run(spec: dict, pairs: Path, profiled: dict) -> tuple[list[float], float]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = getattr(torch, spec["dtype"])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, quantization_config=quantization)
    if not torch.cuda.is_available():
        # As dpo-lora does: on a CPU with AVX512-BF16 the precompute's eval-mode forward would let
        # bitsandbytes repack the weights for inference, after which they pass no gradient.
        from dpo_lora.model.load import _keep_4bit_layout_trainable

        _keep_4bit_layout_trainable(model)
    config = DPOConfig(
        output_dir=str(Path(spec["work"]) / spec["system"]), per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, max_steps=spec["total_steps"], learning_rate=2e-4, lr_scheduler_type="constant",
        warmup_steps=0, beta=0.1, max_length=spec["max_length"], gradient_checkpointing=True,
        bf16=spec["dtype"] == "bfloat16", use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, disable_dropout=True,
        precompute_ref_log_probs=spec["system"] == "trl-precompute",
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times, precompute_s = [], []
    # precompute_ref_log_probs runs while DPOTrainer is built: timed (and counted) here, as dpo-lora's is
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(*args, **kwargs):
        started = time.perf_counter()
        with OpCount(profiled, "upfront_") if spec.get("probe") == "ops" else contextlib.nullcontext():
            result = precompute(*args, **kwargs)
        precompute_s.append(time.perf_counter() - started)
        return result

    DPOTrainer._precompute_ref_logps = timed_precompute

    class Steps(TrainerCallback):
        def on_train_begin(self, *_, optimizer, **__):
            if spec.get("probe") == "ops":
                optimizer.step = OpCount.apart("optimizer", optimizer.step)
                trainer._clip_grad_norm = OpCount.apart("optimizer", trainer._clip_grad_norm)

        def on_step_begin(self, *_, **__):
            if len(times) == spec["warmup"]:
                self.profile = probe(spec, profiled).__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if len(times) == spec["warmup"]:
                self.profile.__exit__(None, None, None)
            times.append(time.perf_counter() - self.start)

    trainer = DPOTrainer(
        model=model, args=config, processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        train_dataset=load_dataset("json", data_files=str(pairs), split="train"), peft_config=lora, callbacks=[Steps()],
    )  # fmt: skip
    trainer.train()
    return times, sum(precompute_s)


def count_dpo_lora_ops(profiled: dict) -> None:
    """Set up OpCount for a dpo-lora run: its reference precompute counted as up-front ops, the
    shared-prompt plan built outside the count (torch makes its masks, tensor subclasses, under no
    dispatch mode), and on the CPU the lower-right causal masks counted apart."""
    import torch
    from torch.nn.attention.bias import CausalBias
    from torch.utils._python_dispatch import _disable_current_modes

    from dpo_lora.model import shared_attention
    from dpo_lora.train import setup as run_setup

    precomputed, plan_for = run_setup._precomputed, shared_attention.plan_for

    def counted(*args, **kwargs):
        with OpCount(profiled, "upfront_"):
            return precomputed(*args, **kwargs)

    def uncounted_plan(*args, **kwargs):
        with _disable_current_modes():
            return plan_for(*args, **kwargs)

    run_setup._precomputed, shared_attention.plan_for = counted, uncounted_plan
    if not torch.cuda.is_available():
        CausalBias._dispatch = staticmethod(OpCount.apart("cpu_only", CausalBias._dispatch))


def dpo_lora_run(spec: dict, pairs: Path, profiled: dict) -> tuple[list[float], float]:
    from dpo_lora.core.config import load_config
    from dpo_lora.train import loop

    output_dir = Path(spec["work"]) / spec["system"]
    overrides = [
        f"model.path={spec['model']}", f"model.dtype={spec['dtype']}", "model.gradient_checkpointing=true",
        "lora.dropout=0.0", f"data.train={pairs}",
        "data.eval=null", f"data.max_length={spec['max_length']}",
        f"data.max_prompt_length={min(spec['max_length'] - 1, 2 * spec['prompt'])}",
        f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum=1", f"train.max_steps={spec['total_steps']}",
        "train.scheduler=constant", "train.warmup_ratio=0", "train.log_every=1", "train.save_every=0",
        f"output_dir={output_dir}", "overwrite=true",
        # as shipped, changed by the name's modifiers ("dpo-lora-flex": FlexAttention), as compare_trl's
        *(f"{key}={value}" for key, value in compare_trl.dpo_lora_settings(spec["system"]).items()),
    ]  # fmt: skip
    os.environ["DPO_LORA_CACHE"] = str(output_dir / "cache")  # cold: every variant pays its own precompute
    precompute_s = compare_trl.time_precompute()
    if spec.get("probe") == "ops":
        count_dpo_lora_ops(profiled)
    real_step, calls = loop.optimizer_step, []

    def optimizer_step(engine, *args, **kwargs):
        calls.append(1)
        if len(calls) != spec["warmup"] + 1:
            return real_step(engine, *args, **kwargs)
        if spec.get("probe") == "ops":
            engine.step = OpCount.apart("optimizer", engine.step)
        with probe(spec, profiled):
            return real_step(engine, *args, **kwargs)

    loop.optimizer_step = optimizer_step
    loop.train(load_config(REPO / "configs/demo.yaml", overrides))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["global_batch"] / row["pairs_per_s"] for row in rows if "pairs_per_s" in row]
    return times, sum(precompute_s)


# ---------------------------------------------------------------- the parent: regimes, budget, report


class Runner:
    """Starts child runs in order while the time budget lasts; records what it had to skip."""

    def __init__(self, args, model: Path, work: Path) -> None:
        self.args, self.model, self.work = args, model, work
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}  # the last run's wall time per system: the next run's estimate

    def run(self, system: str, workload: str, micro_batch: int, max_length: int | None = None, steps=None) -> dict:
        prompt, completion, default_length = WORKLOADS[workload]
        if max_length is not None:  # a length search: fill the length, half prompt, the rest per completion
            prompt, completion = max_length * 2 // 5, max_length * 2 // 5
        warmup, measured = (self.args.warmup, self.args.steps) if steps is None else steps
        spec = {
            "system": system, "model": str(self.model), "dtype": self.args.dtype, "work": str(self.work),
            "prompt": prompt, "completion": completion, "max_length": max_length or default_length,
            "micro_batch": micro_batch, "warmup": warmup, "total_steps": warmup + 1 + measured,
            "cap_gb": self.args.cap_gb if self.regime == "memory-cap" else None,
        }  # fmt: skip
        elapsed = time.perf_counter() - self.started
        estimate = self.seconds.get(system, 0.0)
        if elapsed + estimate > self.args.budget_s:
            print(
                f"  skipped {system} mb{micro_batch}: {elapsed:.0f} s spent, ~{estimate:.0f} s more passes --budget-s"
            )
            return {"skipped": f"time budget ({self.args.budget_s:.0f} s)"}
        spec_file = self.work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(spec_file)], cwd=REPO, capture_output=True, text=True
        )
        self.seconds[system] = time.perf_counter() - started
        if done.returncode != 0 or not done.stdout.strip():
            return {"error": done.stderr[-800:], "oom": "out of memory" in done.stderr.lower()}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(
            spec={k: spec[k] for k in ("micro_batch", "max_length", "prompt", "completion")},
            wall_s=self.seconds[system],
        )
        if "step_times" in result:
            result.update(summarize(result, spec, self.flops_per_token, self.matmul_rate))
        label = result.get("error", "")[:120] or f"{result['pairs_per_s']:.3f} pairs/s, {memory_gb(result):.2f} GB"
        print(f"  {system} {workload} mb{micro_batch} len{spec['max_length']}: {label}", flush=True)
        return result

    def equal_settings(self) -> dict:
        results: dict = {system: {} for system in EQUAL_SYSTEMS}
        for round_ in EQUAL_ROUNDS:
            for workload, micro_batch in EQUAL_SETTINGS:
                for system in round_:
                    results[system][f"{workload}-mb{micro_batch}"] = self.run(system, workload, micro_batch)
        return results

    def memory_cap(self) -> dict:
        results = {"dpo-lora": self.dpo_lora_largest(), "trl": self.trl_largest()}
        for system, result in results.items():
            result["longest_max_length"] = self.longest_length(system)
        # Last, as the budget allows: the layer inputs in host memory (model.offload_activations).
        results["dpo-lora-offload"] = {"longest_max_length": self.longest_length("dpo-lora-offload")}
        return results

    def dpo_lora_largest(self) -> dict:
        """dpo-lora at the largest micro-batch its plan fits under the cap (one measured run)."""
        from dpo_lora.core.config import load_config
        from dpo_lora.model.fitting import largest_fitting
        from dpo_lora.model.memory_plan import plan

        prompt, _, max_length = WORKLOADS["long"]
        config = load_config(REPO / "configs/demo.yaml", [
            f"model.path={self.model}", f"model.dtype={self.args.dtype}", "model.gradient_checkpointing=true",
            f"data.max_length={max_length}", f"data.max_prompt_length={2 * prompt}", "data.eval=null",
        ])  # fmt: skip
        micro_batch = max(1, largest_fitting(config, plan(config), int(self.args.cap_gb * 2**30), "micro_batch_size"))
        if self.args.dry_run:  # a CPU has no cap: the plan's figure for 24 GB would take hours there
            micro_batch = min(micro_batch, 2)
        return {**self.run("dpo-lora", "long", micro_batch), "micro_batch_by": "plan"}

    def trl_largest(self) -> dict:
        """TRL at the largest micro-batch that runs under the cap, doubling from 1 until out of memory."""
        best, micro_batch = {"error": "micro-batch 1 does not fit"}, 1
        while micro_batch <= (2 if self.args.dry_run else 256):
            result = self.run("trl", "long", micro_batch)
            if "pairs_per_s" not in result:
                best = best if micro_batch > 1 or result.get("oom") else result  # skipped or failed: say so
                break
            best, micro_batch = {**result, "micro_batch_by": "doubling until out of memory"}, 2 * micro_batch
        return best

    def longest_length(self, system: str) -> int | None:
        """The longest max_length (doubling from 1024) that trains two steps at micro-batch 1 under the cap."""
        longest = None
        for length in LENGTHS:
            if "pairs_per_s" not in self.run(system, "long", 1, max_length=length, steps=(0, 1)):
                break
            longest = length
        return longest


def summarize(result: dict, spec: dict, flops_per_token: float, matmul_rate: float) -> dict:
    """Medians and spread of the measured steps, the rates they give, and the MFU."""
    measured = result["step_times"][spec["warmup"] + 1 :] or result["step_times"]
    quartiles = statistics.quantiles(measured, n=4) if len(measured) > 1 else [measured[0]] * 3
    median = statistics.median(measured)
    if spec["system"] == "trl-precompute" or spec["system"].startswith("dpo-lora"):
        median += result["pre_steps_s"] / spec["total_steps"]  # an up-front reference pass, spread over the run
    useful_tokens = spec["prompt"] + 2 * spec["completion"]  # the prompt needs to run once per pair
    pairs_per_s = spec["micro_batch"] / median
    return {
        "s_per_step": median,
        "s_per_step_min_max": [min(measured), max(measured)],
        "s_per_step_iqr": [quartiles[0], quartiles[2]],
        "pairs_per_s": pairs_per_s,
        "useful_tokens_per_s": pairs_per_s * useful_tokens,
        "mfu": pairs_per_s * useful_tokens * flops_per_token / matmul_rate,
    }


def memory_gb(result: dict) -> float:
    """The GPU allocator's peak; on a CPU (the dry run) the process's peak RSS."""
    return result.get("max_memory_allocated_gb") or result.get("peak_rss_gb") or 0.0


def prepare_model(args, work: Path) -> Path:
    """The geometry's random-weight model (bench/random_model.py), its positions raised so the
    length search is not stopped by the config; a 2-layer small one for --dry-run."""
    from scale import GEOMETRIES, write_model, write_tokenizer

    name = "dry-run" if args.dry_run else args.geometry
    model = REPO / "runs" / "gpu-regimes" / name
    if not (model / "model.safetensors.index.json").exists():
        import torch

        model.mkdir(parents=True, exist_ok=True)
        write_tokenizer(model)
        write_model(
            model,
            DRY_GEOMETRY if args.dry_run else GEOMETRIES[args.geometry],
            "cuda" if torch.cuda.is_available() else "cpu",
        )
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = max(LENGTHS)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model


def report(regime: str, args, results: dict, runner: Runner) -> Path:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({compare_trl.cpu_flags()})"
    print(f"\n{regime} on {device}, {args.dtype}" + (f", capped at {args.cap_gb} GB" if regime == "memory-cap" else ""))
    rows = [(system, setting, r) for system, by in results.items() for setting, r in (
        by.items() if regime == "equal-settings" else [("largest-mb", by)])]  # fmt: skip
    trl = {setting: r for system, setting, r in rows if system == "trl"}
    print(
        f"{'system':<16}{'setting':<18}{'mb':>4}{'pairs/s':>9}{'MFU':>7}{'alloc GB':>10}{'kernels':>9}{'busy':>6}{'x TRL':>7}{'x mem':>7}"
    )
    for system, setting, r in rows:
        if set(r) <= {"longest_max_length"}:  # a length search alone (dpo-lora-offload)
            continue
        if "pairs_per_s" not in r:
            print(f"{system:<16}{setting:<18}  {r.get('skipped') or r.get('error', '')[:70]}")
            continue
        base = trl.get(setting, {})
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if "pairs_per_s" in base else "-"
        memory = f"{memory_gb(r) / memory_gb(base):.2f}" if memory_gb(base) else "-"
        print(
            f"{system:<16}{setting:<18}{r['spec']['micro_batch']:>4}{r['pairs_per_s']:>9.3f}{r['mfu']:>7.1%}"
            f"{memory_gb(r):>10.2f}{r.get('kernels_per_step') or '-':>9}{r.get('gpu_busy_fraction') or 0:>6.0%}{speed:>7}{memory:>7}"
        )
    if regime == "memory-cap":
        for system, r in results.items():
            print(f"{system}: longest max_length at micro-batch 1 under the cap: {r.get('longest_max_length')}")
    geometry = "dry-run" if args.dry_run else args.geometry
    out = REPO / "bench/results" / f"gpu-{geometry}-{regime}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "regime": regime, "geometry": geometry, "cap_gb": args.cap_gb if regime == "memory-cap" else None,
        "device": device, "dtype": args.dtype, "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps,
        "matmul_flops": runner.matmul_rate, "useful_flops_per_token": runner.flops_per_token, "results": results,
    }, indent=2))  # fmt: skip
    print(f"written {out.relative_to(REPO)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", default="llama2-7b", help="a bench/scale.py geometry")
    parser.add_argument("--regime", default="equal-settings,memory-cap")
    parser.add_argument("--cap-gb", type=float, default=24.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=510.0, help="skip runs that would end past this")
    parser.add_argument("--dry-run", action="store_true", help="a 2-layer model on the CPU, 1 + 2 steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        if spec["system"].startswith("dpo-lora"):
            from dpo_lora.core.cpu_memory import huge_pages_for_tensors

            huge_pages_for_tensors()  # as `dpo-lora train` does, before torch is imported
        print(json.dumps(child(spec)))
        return
    if args.dry_run:  # every path once, quickly: short sequences, no time budget
        args.warmup, args.steps, args.dtype, args.budget_s = 1, 2, "float32", float("inf")
        WORKLOADS.update({name: (p // 10, c // 10, n // 10) for name, (p, c, n) in WORKLOADS.items()})
        LENGTHS[:] = [128, 256]
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(args, prepare_model(args, Path(tmp)), Path(tmp))
        runner.matmul_rate = compare_trl.matmul_flops(args.dtype)
        runner.flops_per_token = compare_trl.useful_flops_per_token(str(runner.model))
        print(
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}: matmul {runner.matmul_rate / 1e12:.1f} TFLOP/s ({args.dtype})"
        )
        for regime in args.regime.split(","):
            runner.regime = regime
            print(f"regime {regime}:", flush=True)
            results = runner.equal_settings() if regime == "equal-settings" else runner.memory_cap()
            report(regime, args, results, runner)


if __name__ == "__main__":
    main()
