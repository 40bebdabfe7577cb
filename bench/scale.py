"""A 7B and an 8B model end to end on this machine: write, train, export (both targets), load;
and a 13B model under ZeRO-3 on two CPU ranks, against one.

    python bench/scale.py --geometry llama2-7b [--work DIR] [--layers N] [--keep]
    python bench/scale.py --geometry llama2-13b --zero 3 --ranks 2 [--work DIR] [--layers N]

Writes a random-weight model of the geometry (Llama-2-7B: 32 layers, hidden 4096, intermediate
11008, vocab 32000; Llama-3-8B: intermediate 14336, 8 KV heads, vocab 128256) as bfloat16
safetensors, one shard per layer, never holding the model in memory. Trains it with
`dpo-lora train` (NF4, LoRA r=16 all-linear, ZeRO-2, gradient checkpointing, 2 optimizer steps of
1 pair, max_length 256), exports it with `--merge-into dequantized` and `original` (bfloat16), and
loads the export with plain `AutoModelForCausalLM.from_pretrained`. Each stage runs in its own
process, sampled every 50 ms for peak RssAnon (anonymous memory: mmapped safetensors are page
cache, not the process's) and peak RSS. The compute dtype is float32: on CPUs without AVX512-BF16
(this one), bitsandbytes' bf16 4-bit backward is ~30x slower. `--layers N` cuts the depth for a
quick check of the bench itself. Results: bench/results/scale-GEOMETRY-TIMESTAMP.{json,md}.

With `--zero 3` (deepspeed_configs/zero3.json, `train.cpu_mmap_threshold_mb=1`: see
CPU_MMAP_THRESHOLD_MB) the model trains the same 2 steps on `--ranks` CPU ranks through
DeepSpeed's launcher (one pair per rank per step), then on one rank, each rank's process sampled
on its own; the adapter is exported with `--adapter-only`. Each rank's share of the parameters is
what the ZeRO-3 loader reports. Results: bench/results/scale-GEOMETRY-zero3-rN-TIMESTAMP.json
with per_rank_peak_anon_gib, one_rank_peak_anon_gib, per_rank_params_gib, plan_per_rank_gib and the losses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DPO_LORA = [sys.executable, "-m", "dpo_lora"]
GEOMETRIES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0),
}  # fmt: skip
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bundled_text() -> str:
    rows = [json.loads(line) for line in (REPO / "data/sentiment/train.jsonl").read_text().splitlines()]
    return " ".join(m["content"] for row in rows for m in row["prompt"] + row["chosen"] + row["rejected"])


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on the bundled data (no hub here); its ids fit any vocab >= 4000."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator([bundled_text()], trainers.BpeTrainer(vocab_size=4000, special_tokens=special, initial_alphabet=alphabet))  # fmt: skip
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML,
    ).save_pretrained(folder)  # fmt: skip


def write_model(folder: Path, geometry: dict, device: str = "cpu") -> float:
    """Random bfloat16 weights (std 0.02, norms 1) in shards: embeddings, one per layer, then the
    head and final norm, drawn on `device` (a GPU draws a 7B in seconds, a CPU core in minutes).
    Returns the parameter count in billions."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**geometry, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name.split(".")[-2]
        groups.setdefault(key, []).append(name)
    order = ["embed_tokens", *[k for k in groups if k.startswith("model.layers.")], "norm", "lm_head"]
    generator = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    for index, key in enumerate(order):
        file = f"model-{index + 1:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name in groups[key]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                drawn = torch.randn(shapes[name], generator=generator, device=device)
                tensors[name] = (drawn * 0.02).to(torch.bfloat16).cpu()
            weight_map[name] = file
            total += tensors[name].numel()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total / 1e9


def write_pairs(path: Path, tokenizer_dir: Path, count: int = 2) -> None:
    """Pairs that fill max_length 256: a 128-token prompt, 200-token completions (cut to 128)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(bundled_text(), add_special_tokens=False)["input_ids"]
    piece = lambda start, n: tokenizer.decode(ids[start : start + n])  # noqa: E731
    rows = [{"prompt": piece(900 * i, 128), "chosen": " " + piece(900 * i + 300, 200),
             "rejected": " " + piece(900 * i + 600, 200)} for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


class Sampler:
    """Peak RssAnon and RSS (MiB) of a process and its children, with timestamps."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self.running = pid, [], True
        self.rank_anon: dict[int, float] = {}  # local rank (DeepSpeed's --local_rank=K; else 0) -> peak MiB
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _tree(self, pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid, *(p for child in children for p in self._tree(int(child)))]

    def _run(self) -> None:
        while self.running:
            anon = rss = 0
            for pid in self._tree(self.pid):
                try:
                    status = Path(f"/proc/{pid}/status").read_text().splitlines()
                except OSError:
                    continue
                fields = {
                    line.split(":")[0]: line.split()[1] for line in status if line.startswith(("RssAnon", "VmRSS"))
                }
                anon, rss = anon + int(fields.get("RssAnon", 0)), rss + int(fields.get("VmRSS", 0))
                rank = self._rank(pid)
                if rank is not None:
                    self.rank_anon[rank] = max(self.rank_anon.get(rank, 0.0), int(fields.get("RssAnon", 0)) / 1024)
            self.samples.append((time.time(), anon / 1024, rss / 1024))
            time.sleep(0.05)

    def _rank(self, pid: int) -> int | None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return None
        ranks = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--local_rank=")]
        if ranks:
            return int(ranks[0])
        return 0 if pid == self.pid and "train" in argv and "deepspeed" not in " ".join(argv[:2]) else None

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, float]:
        inside = [(a, r) for t, a, r in self.samples if start <= t <= end] or [(0.0, 0.0)]
        return max(a for a, _ in inside), max(r for _, r in inside)


def run_stage(command: list[str], log: Path) -> tuple[float, float, Sampler]:
    """Run `command`, its output to `log`; returns (start time, seconds, sampler). Exits on failure."""
    start = time.time()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = Sampler(process.pid)
        code = process.wait()
    sampler.running = False
    if code != 0:
        sys.exit(f"bench/scale.py: {' '.join(command[:4])} failed ({code}); see {log}")
    return start, time.time() - start, sampler


LOAD_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
ids = AutoTokenizer.from_pretrained(sys.argv[1])("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    assert torch.isfinite(model(input_ids=ids).logits).all()
print(sum(p.numel() for p in model.parameters()))
"""


# CPU ranks: tensors of 1 MB and more on their own pages. Measured on the 4-layer cut of llama2-13b
# at 2 ranks (float32, 2-core AVX2): glibc otherwise kept 1.2-1.3 GiB of freed heap per rank after a
# backward (each rank's peak RssAnon 4.38 GiB against 3.29 with this and zero3.json's prefetch off).
CPU_MMAP_THRESHOLD_MB = 1


def train_args(work: Path, zero_json: str, out: Path) -> list[str]:
    """`dpo-lora train`'s arguments: NF4, LoRA r16 all-linear, 2 steps of one pair per rank x 256 tokens.
    No self-check: its five no-grad forwards of the first pair (eval mode, bitsandbytes' CPU
    inference kernel) took over 20 minutes at 13B on 2 cores and reach no higher peak than a step."""
    return ["train", str(REPO / "configs/demo.yaml"), "--overwrite",
            f"model.path={work / 'model'}", "model.quantization=nf4", "model.dtype=float32",
            "model.gradient_checkpointing=true", "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear",
            f"data.train={work / 'pairs.jsonl'}", "data.eval=null", "data.max_length=256",
            "data.max_prompt_length=128", "train.micro_batch_size=1", "train.grad_accum=1", "train.max_steps=2",
            "train.warmup_ratio=0", "train.save_every=0", "train.log_every=1", "train.self_check=false",
            f"deepspeed={REPO / 'deepspeed_configs' / zero_json}", f"output_dir={out}"]  # fmt: skip


def zero3_args(work: Path, out: Path) -> list[str]:
    return [*train_args(work, "zero3.json", out), f"train.cpu_mmap_threshold_mb={CPU_MMAP_THRESHOLD_MB}"]


def zero3_runs(args, work: Path, geometry: dict, billions: float) -> None:
    """The ZeRO-3 runs on `--ranks` ranks and on one: per-rank peaks, held parameters, plan, losses."""
    import re

    result = {"geometry": args.geometry, "shape": geometry, "billions": billions, "ranks": args.ranks,
              "zero": "deepspeed_configs/zero3.json", "cpu_mmap_threshold_mb": CPU_MMAP_THRESHOLD_MB, "dtype": "float32", "cpu_flags": cpu_flags()}  # fmt: skip
    for ranks in dict.fromkeys((args.ranks, 1)):
        out = work / f"run-r{ranks}"
        launcher = DPO_LORA
        if ranks > 1:
            deepspeed = str(Path(sys.executable).parent / "deepspeed")
            launcher = [deepspeed, "--num_gpus", str(ranks), "--master_port", "29655", "--module", "dpo_lora"]
        _, seconds, sampler = run_stage([*launcher, *zero3_args(work, out)], work / f"train-r{ranks}.log")
        held = re.search(r"rank 0 holds ([0-9.]+) (GiB|MiB) of its ([0-9.]+) (GiB|MiB) of parameters",
                         (work / f"train-r{ranks}.log").read_text())  # fmt: skip
        scale = {"GiB": 1, "MiB": 1 / 1024}
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        peaks = [sampler.rank_anon[rank] / 1024 for rank in sorted(sampler.rank_anon)]
        plan_args = [arg for arg in zero3_args(work, out)[1:] if arg != "--overwrite"]
        planned = subprocess.run([*DPO_LORA, "plan", *plan_args, "--gpus", str(ranks), "--json"],
                                 capture_output=True, text=True, cwd=REPO)  # fmt: skip
        planned = json.loads(planned.stdout[planned.stdout.index("{") :])
        key = "" if ranks == args.ranks else "one_rank_"
        result |= {
            f"{key}seconds": seconds,
            f"{key}peak_anon_gib" if key else "per_rank_peak_anon_gib": peaks if not key else peaks[0],
            f"{key}params_gib" if key else "per_rank_params_gib": float(held[1]) * scale[held[2]],
            f"{key}whole_params_gib": float(held[3]) * scale[held[4]],
            f"{key}plan_per_rank_gib": planned["total_bytes"] / 2**30,
            f"{key}plan_components_gib": {k: v / 2**30 for k, v in planned["components"].items()},
            f"{key}losses": [row["loss"] for row in metrics if "loss" in row],
        }
    _, result["export_adapter_seconds"], _ = run_stage(
        [*DPO_LORA, "export", str(work / f"run-r{args.ranks}"), "--adapter-only", "--out", str(work / "adapter"),
         "--overwrite"], work / "export.log")  # fmt: skip
    result["params_ratio"] = result["per_rank_params_gib"] / result["one_rank_params_gib"]
    result["anon_ratio"] = [peak / result["one_rank_peak_anon_gib"] for peak in result["per_rank_peak_anon_gib"]]
    if not args.keep:
        shutil.rmtree(work / "model")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cut = f"-{args.layers}layers" if args.layers else ""  # a cut-down check of the bench, not the model
    path = REPO / f"bench/results/scale-{args.geometry}{cut}-zero3-r{args.ranks}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("components_gib")}, indent=2))
    print(f"wrote {path.relative_to(REPO)}")


def cpu_flags() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return "avx512_bf16/amx" if "avx512_bf16" in flags or "amx_bf16" in flags else "avx2 only (no AVX512-BF16/AMX)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama2-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo-lora-scale"), help="scratch folder (~3x the model)")
    parser.add_argument("--layers", type=int, default=0, help="cut the depth to N layers (0: the real depth)")
    parser.add_argument("--keep", action="store_true", help="keep the model and exports afterwards")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2, help="3: ZeRO-3 on --ranks ranks, then one")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the ZeRO-3 run (CPU ranks)")
    args = parser.parse_args()
    geometry = dict(GEOMETRIES[args.geometry], **({"num_hidden_layers": args.layers} if args.layers else {}))
    work = args.work / args.geometry
    shutil.rmtree(work, ignore_errors=True)
    (work / "model").mkdir(parents=True)
    rows = []

    started = time.time()
    write_tokenizer(work / "model")
    billions = write_model(work / "model", geometry)
    write_pairs(work / "pairs.jsonl", work / "model")
    rows.append({"stage": "write bf16 model (bench)", "seconds": time.time() - started})

    if args.zero == 3:
        zero3_runs(args, work, geometry, billions)
        return
    train = [*DPO_LORA, *train_args(work, "zero2.json", work / "run")]
    start, seconds, sampler = run_stage(train, work / "train.log")
    metrics = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    steps = [row for row in metrics if "loss" in row]
    step_seconds = [1 / row["pairs_per_s"] for row in steps]
    first_row_at = (work / "run/metrics.jsonl").stat().st_mtime - sum(step_seconds)  # ~when step 1 began
    load_end = min(first_row_at, start + seconds)
    rows.append({"stage": "train: load + quantize", "seconds": load_end - start, "peak": sampler.peak(end=load_end)})
    rows.append({"stage": "train: 2 steps + save", "seconds": start + seconds - load_end,
                 "s_per_step": sum(step_seconds) / len(step_seconds), "peak": sampler.peak(start=load_end),
                 "losses": [row["loss"] for row in steps]})  # fmt: skip

    plan_args = [arg for arg in train[len(DPO_LORA) + 1 :] if arg != "--overwrite"]
    planned = subprocess.run([*DPO_LORA, "plan", *plan_args, "--json"], capture_output=True, text=True, cwd=REPO)
    if planned.returncode == 0:
        rows[-1]["plan_total_gib"] = json.loads(planned.stdout)["total_bytes"] / 2**30
        rows[-1]["plan_components"] = json.loads(planned.stdout)["components"]

    for target in ("dequantized", "original"):
        out = work / f"export-{target}"
        export = [
            *DPO_LORA,
            "export",
            str(work / "run"),
            "--out",
            str(out),
            "--merge-into",
            target,
            "--dtype",
            "bfloat16",
        ]
        _, seconds, sampler = run_stage(export, work / f"export-{target}.log")
        report = json.loads((out / "export_report.json").read_text())
        rows.append({"stage": f"export --merge-into {target}", "seconds": seconds, "peak": sampler.peak(),
                     **{k: v for k, v in report.items() if k.startswith("max_logp_diff")}})  # fmt: skip
        _, seconds, sampler = run_stage([sys.executable, "-c", LOAD_CHECK, str(out)], work / f"load-{target}.log")
        rows.append({"stage": f"from_pretrained({target} export), bf16", "seconds": seconds, "peak": sampler.peak()})
        if not args.keep:
            shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(work / "model")

    print_report(args.geometry, geometry, billions, rows)


def print_report(name: str, geometry: dict, billions: float, rows: list[dict]) -> None:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    header = (f"{name}: {billions:.2f}B parameters ({geometry['num_hidden_layers']} layers, vocab "
              f"{geometry['vocab_size']}); float32 compute; CPU {'with' if has_bf16 else 'without'} AVX512-BF16/AMX")  # fmt: skip
    lines = [header, "", "| stage | seconds | peak RssAnon GiB | peak RSS GiB | notes |", "|---|---|---|---|---|"]
    for row in rows:
        anon, rss = row.get("peak", (None, None))
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if k not in ("stage", "seconds", "peak", "plan_components"))  # fmt: skip
        memory = f"{anon / 1024:.2f} | {rss / 1024:.2f}" if anon is not None else "- | -"
        lines.append(f"| {row['stage']} | {row['seconds']:.0f} | {memory} | {notes} |")
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (REPO / "bench/results").mkdir(exist_ok=True)
    (REPO / f"bench/results/scale-{name}-{stamp}.md").write_text(text + "\n")
    (REPO / f"bench/results/scale-{name}-{stamp}.json").write_text(
        json.dumps({"geometry": geometry, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
