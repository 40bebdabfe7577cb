"""Where one dpo-lora training step's time goes, on compare_trl's workloads.

    python bench/profile_step.py [--workload short|long] [--dtype float32|bfloat16] [--steps N]
                                 [--top N] [dotted.key=value ...]

Builds the run exactly as `dpo-lora train` does (dpo_lora.train.setup) with compare_trl's model,
data shape and settings, then times each part of the step the trainer runs: data (next batch to
the device), reference forward (adapter off, no grad; none when precomputed), policy forward,
backward (split into the gradient-checkpointing recompute, i.e. decoder layers run again inside
backward, and the rest), and the optimizer step. Prints the median of each part over the steps
after the first two, with the CPU flags and dtype. On a GPU each mark waits for the device, and the
memory held after setup and the steps' peak (the CUDA allocator's) are printed too. `--top N`
also prints torch.profiler's N costliest ops over the measured steps, by self time on the device
(or the CPU) and by self CPU time: where launch overhead, not arithmetic, sets the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, WORKLOADS, bf16_capability, cpu_flags, workload_overrides, write_epoch  # noqa: E402


class LayerClock:
    """Seconds spent in decoder layers' forwards while autograd runs backward (the recompute).

    transformers checkpoints a layer's `forward`, not its `__call__`, so a layer's own hooks do not
    run again in the recompute; its parts' hooks (attention, MLP, norms: called one after another)
    do. `always_call`: the recompute stops with an exception once it has what backward needs
    (torch's checkpoint early stop), inside the last part."""

    def __init__(self, model):
        self.seconds, self.started, self.in_backward = 0.0, {}, False
        for layer in model.get_base_model().model.layers:
            for part in layer.children():
                part.register_forward_pre_hook(self.enter)
                part.register_forward_hook(self.leave, always_call=True)

    def enter(self, module, _):
        if self.in_backward:
            self.started[module] = time.perf_counter()

    def leave(self, module, *_):
        if module in self.started:
            self.seconds += time.perf_counter() - self.started.pop(module)


WARMUP = 2  # steps left out of the medians (allocator and kernel warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=6, help=f"steps to run; the median is over those after {WARMUP}")
    parser.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    parser.add_argument("--top", type=int, default=0, help="print torch.profiler's N costliest ops (0: no profiler)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. dpo.reference=online")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps the median leaves out")

    from transformers import AutoTokenizer

    from dpo_lora.core.config import load_config
    from dpo_lora.data.layout import to_device
    from dpo_lora.model.load import reference_mode
    from dpo_lora.train.setup import setup_run
    from dpo_lora.train.step import concatenated_logps, pair_losses

    micro_batch = WORKLOADS[args.workload][2]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file = work / "pairs.jsonl"
        write_epoch(args, tokenizer, data_file)
        overrides = [*workload_overrides(args, data_file, work / "run"), *args.overrides]
        config = load_config(REPO / "configs/demo.yaml", overrides)
        run = setup_run(config)
        engine, stream, parts = run.engine, iter(run.batches), defaultdict(list)
        clock = LayerClock(engine.module)
        engine.train()
        cuda = run.dist.device.type == "cuda"
        now = (lambda: torch.cuda.synchronize() or time.perf_counter()) if cuda else time.perf_counter
        held_after_setup = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # the steps' peak, not the setup's (a precompute's)
        profiler = torch.profiler.profile(activities=profiler_activities(cuda)) if args.top else None
        for step in range(args.steps):
            if profiler and step == WARMUP:
                profiler.start()
            marks = [now()]
            batch = to_device(next(stream), run.dist.device)
            marks.append(now())
            if "reference_logps" in batch:
                ref_logps = batch["reference_logps"]
            else:
                with torch.no_grad(), reference_mode(engine.module):
                    ref_logps = concatenated_logps(engine, batch)[0]
            marks.append(now())
            policy_logps, lengths = concatenated_logps(engine, batch)
            loss, _ = pair_losses(policy_logps, ref_logps, lengths, config.dpo)
            marks.append(now())
            clock.seconds, clock.in_backward = 0.0, True
            engine.backward(loss)
            clock.in_backward = False
            marks.append(now())
            engine.step()
            marks.append(now())
            seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
            for name, value in zip(("data", "reference forward", "policy forward"), seconds, strict=False):
                parts[name].append(value)
            parts["recompute (in backward)"].append(clock.seconds)
            parts["backward (rest)"].append(seconds[3] - clock.seconds)
            parts["optimizer step"].append(seconds[4])
            parts["step"].append(marks[-1] - marks[0])
        if profiler:
            profiler.stop()

    print(f"\nworkload {args.workload}, {args.dtype}, {micro_batch} pairs/step; {bf16_capability()}; "
          f"CPU flags: {cpu_flags()}; overrides: {' '.join(args.overrides) or 'none'}")  # fmt: skip
    step = statistics.median(parts["step"][WARMUP:])
    for name, values in parts.items():
        median = statistics.median(values[WARMUP:])
        print(f"  {name:<26}{median:>8.3f} s{100 * median / step:>6.0f}%")
    if cuda:
        print(f"  GPU memory held after setup {held_after_setup / 2**30:.3f} GiB, "
              f"peak over the steps {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB")  # fmt: skip
    if profiler:
        table = profiler.key_averages()
        device_sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        for sort_by in dict.fromkeys((device_sort, "self_cpu_time_total")):
            print(f"\ntop {args.top} ops by {sort_by}, over steps {WARMUP + 1}-{args.steps}:")
            print(table.table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))


def profiler_activities(cuda: bool) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    return activities + [torch.profiler.ProfilerActivity.CUDA] if cuda else activities


if __name__ == "__main__":
    main()
