"""PNG charts of a run's metrics.jsonl (matplotlib is an optional extra: `pip install dpo-lora[plot]`)."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_lora.core.errors import UserError

CHARTS = {
    "loss.png": ("DPO loss", ["loss"]),
    "rewards.png": ("Reward accuracy and margin", ["rewards/accuracies", "rewards/margins"]),
    "logps.png": ("Policy log-probs of completions", ["logps/chosen", "logps/rejected"]),
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'dpo-lora[plot]'") from None
    return plt


def chart(rows: list[dict], title: str, names: list[str], width: float = 6):
    """One figure of `names` (a panel each), train and eval series against the optimizer step.
    Each line's SVG id is its series name (`loss`, `eval/loss`), so a reader can find its points."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(width * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for prefix, style in (("", ".-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + name]) for r in rows if r.get(prefix + name) is not None]
            if points:
                (line,) = ax.plot(*zip(*points, strict=True), style, label="eval" if prefix else "train")
                line.set_gid(prefix + name)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def chart_svg(rows: list[dict], name: str, width: float = 4) -> bytes:
    """CHARTS[name + ".png"] as SVG (the service's dashboard draws its charts with this)."""
    import io

    title, names = CHARTS[f"{name}.png"]
    figure = chart(rows, title, names, width)
    out = io.BytesIO()
    figure.savefig(out, format="svg")
    _pyplot().close(figure)
    return out.getvalue()


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/*.png (train and eval series); returns the files written."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl to plot")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for file, (title, names) in CHARTS.items():
        figure = chart(rows, title, names)
        figure.savefig(out / file, dpi=100)
        plt.close(figure)
        written.append(out / file)
    return written
