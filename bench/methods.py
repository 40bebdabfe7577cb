"""The preference methods side by side on the bundled sentiment task: each trains the demo's step
budget (configs/demo.yaml: SmolLM2-135M-Instruct in NF4, 10 steps of 8 pairs) at three learning
rates, then `dpo-lora generate` samples the 61 held-out prompts from the policy and the reference
and scores them with the task's judge: mean reward and KL(policy || reference), as the demo does.

    python bench/methods.py [--methods sigmoid,rpo,...] [--lrs 3.5e-4,7e-4,1.4e-3]
    python bench/methods.py --plot-only      # one plot of every result file so far

Writes bench/results/methods-TIMESTAMP.json (one row per run, as it finishes) and, with
matplotlib, docs/methods-frontier.png: reward against KL, the DPO paper's sentiment frontier axes.
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
METHODS = {
    "sigmoid": ["dpo.loss=sigmoid"],
    "rpo": ["dpo.loss=[sigmoid, sft]"],
    "ipo": ["dpo.loss=ipo"],
    "simpo": ["dpo.loss=simpo", "dpo.beta=2.5", "dpo.simpo_gamma=1.25"],  # its paper: beta 2-10, gamma/beta ~0.5
    "orpo": ["dpo.loss=orpo"],
    "dpop": ["dpo.loss=dpop"],
    "kto": ["dpo.loss=kto"],  # on the pairs split into labelled rows
}


def unpaired(path: Path) -> Path:
    """The bundled pairs as KTO rows: each chosen completion desirable, each rejected one not."""
    rows = []
    for line in (REPO / "data" / "sentiment" / "train.jsonl").read_text().splitlines():
        pair = json.loads(line)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(method: str, lr: str, work: Path) -> dict:
    out = work / f"{method}-{lr}"
    overrides = [*METHODS[method], f"train.lr={lr}", f"output_dir={out}", "overwrite=true"]
    if method == "kto":
        overrides.append(f"data.train={unpaired(work / 'kto.jsonl')}")
    cli = [sys.executable, "-m", "dpo_lora"]
    started = time.perf_counter()
    subprocess.run([*cli, "train", "configs/demo.yaml", *overrides], cwd=REPO, capture_output=True, check=True)
    subprocess.run(
        [*cli, "generate", str(out), "--prompts", "data/sentiment/eval.jsonl", "--n", "1", "--max-new-tokens", "32",
         "--batch-size", "64", "--reward", "data.sentiment_scorer:score", "--out", str(out / "generations.json")],
        cwd=REPO, capture_output=True, check=True,
    )  # fmt: skip
    summary = json.loads((out / "generations.json").read_text())["summary"]
    row = {"method": method, "lr": float(lr), "overrides": METHODS[method], **summary,
           "seconds": time.perf_counter() - started}  # fmt: skip
    print(
        f"{method:<8} lr {lr:<7} reward {summary['policy_mean_reward']:.3f} (reference "
        f"{summary['reference_mean_reward']:.3f}), win rate {summary['policy_win_rate']:.2f}, KL {summary['kl_estimate']:.2f}",
        flush=True,
    )
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl_estimate"])
        if mine:
            axes.plot([r["kl_estimate"] for r in mine], [r["policy_mean_reward"] for r in mine], "o-", label=method)
    if rows:
        axes.axhline(rows[0]["reference_mean_reward"], color="grey", linestyle=":", label="reference")
    axes.set_xlabel("KL(policy || reference), nats per sample")
    axes.set_ylabel("mean reward on held-out prompts")
    lrs = sorted({r["lr"] for r in rows})
    axes.set_title(f"Sentiment task: reward against KL at lr {', '.join(f'{lr:g}' for lr in lrs)}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="7e-4,3.5e-4,1.4e-3")
    parser.add_argument("--plot-only", action="store_true", help="replot every bench/results/methods-*.json")
    args = parser.parse_args()
    if args.plot_only:
        files = sorted((REPO / "bench" / "results").glob("methods-*.json"))
        plot([row for file in files for row in json.loads(file.read_text())], REPO / "docs" / "methods-frontier.png")
        print(f"replotted {len(files)} result files into docs/methods-frontier.png")
        return 0
    out = REPO / "bench" / "results" / f"methods-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for lr in args.lrs.split(","):
            for method in args.methods.split(","):
                rows.append(run(method, lr, Path(scratch)))
                out.write_text(json.dumps(rows, indent=2))
    plot(rows, REPO / "docs" / "methods-frontier.png")
    print(f"wrote {out.relative_to(REPO)} and docs/methods-frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
