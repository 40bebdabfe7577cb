"""`dpo-lora plot RUN`: PNG charts of a run's metrics into RUN/plots/."""

from __future__ import annotations

from dpo_lora.train.plots import plot_run


def run(args) -> int:
    for path in plot_run(args.run):
        print(path)
    return 0
