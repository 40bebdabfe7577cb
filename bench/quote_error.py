"""The quote's time against real runs: for each case, `dpo-lora plan --time --json` (the estimate),
then `dpo-lora train` timed from launch to exit (the truth), on SmolLM2-135M-Instruct (NF4) from
configs/demo.yaml with the case's lengths, batch sizes and options.

    python bench/quote_error.py [--cases short-b4,long-b2,...] [--dtype float32]

Prints one line per case and the mean absolute error; writes bench/results/quote-error-TIMESTAMP.json.
The quote's defaults (dpo_lora.model.quote: EFFICIENCY, STARTUP_SECONDS) were set from the demo
run, which is not one of these cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from compare_trl import cpu_flags, make_pairs  # noqa: E402

# name -> (prompt tokens, completion tokens or None for the bundled data, overrides)
CASES = {
    "short-b4": (None, None, ["train.micro_batch_size=4", "data.max_length=64", "data.max_prompt_length=48",
                              "train.max_steps=8"]),
    "bundled-b16": (None, None, ["train.micro_batch_size=16", "train.max_steps=4"]),
    "checkpointed-b8": (None, None, ["model.gradient_checkpointing=true", "train.max_steps=6"]),
    "accum-eval": (None, None, ["train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=5",
                                "data.eval=data/sentiment/eval.jsonl", "train.eval_batch_size=16"]),
    "long-b2": (300, 480, ["train.micro_batch_size=2", "data.max_length=1024", "data.max_prompt_length=600",
                           "model.gradient_checkpointing=true", "train.max_steps=4"]),
}  # fmt: skip


def run_case(name: str, dtype: str, work: Path) -> dict:
    prompt_tokens, completion_tokens, overrides = CASES[name]
    overrides = [*overrides, f"model.dtype={dtype}", f"output_dir={work / name}", "overwrite=true"]
    if prompt_tokens is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "SmolLM2-135M-Instruct")
        steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps="))
        batch = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.micro_batch_size="))
        pairs = make_pairs(tokenizer, prompt_tokens, completion_tokens, count=steps * batch)
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        overrides.append(f"data.train={data}")
    cli = [sys.executable, "-m", "dpo_lora"]
    plan = subprocess.run(
        [*cli, "plan", "configs/demo.yaml", *overrides, "--time", "--json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    quoted = json.loads(plan.stdout)
    started = time.perf_counter()
    subprocess.run([*cli, "train", "configs/demo.yaml", *overrides], cwd=REPO, capture_output=True, check=True)
    seconds = time.perf_counter() - started
    error = quoted["estimated_seconds"] / seconds - 1
    print(f"{name:<16} estimated {quoted['estimated_seconds']:7.1f} s  measured {seconds:7.1f} s  error {error:+.1%}")
    return {"case": name, "overrides": overrides, "quote": quoted, "measured_seconds": seconds, "error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; dtype {args.dtype}")
    with tempfile.TemporaryDirectory() as scratch:
        results = [run_case(name, args.dtype, Path(scratch)) for name in args.cases.split(",")]
    mean = sum(abs(r["error"]) for r in results) / len(results)
    print(f"mean absolute error: {mean:.1%} over {len(results)} runs")
    out = REPO / "bench" / "results" / f"quote-error-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"cpu_flags": cpu_flags(), "dtype": args.dtype, "runs": results,
                               "mean_absolute_error": mean}, indent=2))  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
