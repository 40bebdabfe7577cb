"""The DPO training loop on the DeepSpeed engine.

Per optimizer step: micro-batches -> reference log-probs (adapter off, no grad) -> policy log-probs
-> loss -> backward -> step (-> the reference becomes the policy, TR-DPO) -> log; evaluation before training, every `train.eval_every` steps and
after; checkpoints every `train.save_every` steps, at the end and on SIGTERM/SIGINT. What happens
before the first step (data, engine, layout, resume) is dpo_lora.train.setup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dpo_lora.core import rundir
from dpo_lora.core.config import to_dict
from dpo_lora.core.distributed import all_reduce_sum, any_rank_flag, barrier, gather_lists, peak_memory_bytes
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import RowKind
from dpo_lora.core.schema import Config
from dpo_lora.data.layout import HOST, to_device
from dpo_lora.model.moving_reference import reference_state, sync_reference
from dpo_lora.train import best
from dpo_lora.train.checkpoints import save_checkpoint
from dpo_lora.train.evaluation import EvalShard  # noqa: F401  (part of this module's API)
from dpo_lora.train.guards import LOSS_SCALE_OVERFLOW, NumericGuard, StopRequest
from dpo_lora.train.metrics import margin_length_correlation
from dpo_lora.train.plots import plot_run
from dpo_lora.train.setup import Run, setup_run
from dpo_lora.train.step import preference_step

ADAPTER_DIR = rundir.ADAPTER
# A file rank 0 creates when a signal stopped the run with its checkpoint saved (launch/slurm.sbatch
# requeues the job when it exists).
STOPPED_FILE_VARIABLE = "DPO_LORA_STOPPED_FILE"


def train(config: Config) -> dict:
    """Train the adapter. Returns {"before", "after": eval metrics, "steps": n, "stopped": bool}."""
    from tqdm.auto import tqdm

    run = setup_run(config)
    train_cfg, stop, stream = config.train, StopRequest(), iter(run.batches)
    progress = tqdm(
        total=run.total_steps, initial=run.start_step, desc="dpo", disable=not run.dist.is_main, dynamic_ncols=True
    )
    window_start = time.perf_counter()
    run.engine.train()
    stopped = False
    for step in range(run.start_step + 1, run.total_steps + 1):
        lr = run.scheduler.get_last_lr()[0]
        micro_stats, skip_reason, bad_rows = optimizer_step(
            run.engine, stream, config, run.guard, run.trainable, run.dist.device, run.bco_delta()
        )
        record_step(run, step, micro_stats, skip_reason, bad_rows)
        if config.dpo.sync_reference_every and step % config.dpo.sync_reference_every == 0:
            sync_reference(run.engine.module)  # TR-DPO: the reference becomes the policy
        last = step == run.total_steps
        if step % train_cfg.log_every == 0 or last:
            window_start = log_window(run, step, lr, window_start, progress)
        progress.update(1)

        improved = early_stop = False
        if run.eval_loader is not None and (last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)):
            metrics = run.evaluate()
            if run.best is not None:
                improved = run.best.observe(step, metrics)
                early_stop = run.best.out_of_patience(train_cfg.early_stopping_patience) and not last
            run.results["after" if last or early_stop else "latest"] = metrics
            run.log(RowKind.EVAL, {"step": step, "epoch": run.epoch(), **metrics})
            run.warn(run.monitors.observe_eval(step, metrics))
            window_start = time.perf_counter()
        stopped = stop.agreed()
        if stopped or last or improved or early_stop or (train_cfg.save_every and step % train_cfg.save_every == 0):
            path = save(run, step, is_best=improved)
        if early_stop:
            if run.dist.is_main:
                print(
                    f"\ndpo-lora: early stop at step {step}: {best.describe(train_cfg.best_metric)} has not improved for "
                    f"{run.best.evals_since} evals (train.early_stopping_patience); best: step {run.best.step}"
                )
            stopped = False  # the run is over, even if a signal came at this step too: write its adapter
            break
        if stopped:
            if run.dist.is_main:
                print(f"\ndpo-lora: stopped at step {step}; checkpoint {path}; continue with --resume")
                if marker := os.environ.get(STOPPED_FILE_VARIABLE):  # for a scheduler's wrapper to requeue
                    Path(marker).touch()
            break
    progress.close()
    stop.restore()

    if not stopped:
        run.save_adapter(run.output_dir / ADAPTER_DIR)
    if run.writer is not None:
        run.writer.close()
        _plot_if_possible(run.output_dir)
    barrier()
    return {**run.results, "steps": run.total_steps, "stopped": stopped}


def record_step(run: Run, step: int, micro_stats, skip_reason: str | None, bad_rows: list) -> None:
    """A skipped step is logged (with the bad rows); a taken one adds its statistics to the window."""
    if run.guard.record(step, skip_reason, bad_rows):
        run.log(RowKind.SKIPPED, {"step": step, "epoch": run.epoch(), "skipped": skip_reason, "rows": bad_rows})
        return
    for stats, facts in micro_stats:
        run.window.add(stats, facts.tokens, slots=facts.slots)
    if "bco_pair" in dict(run.config.dpo.terms):
        run.reward_sums = [a + b for a, b in zip(run.reward_sums, _reward_sums(micro_stats), strict=True)]


def log_window(run: Run, step: int, lr: float, window_start: float, progress) -> float:
    """Write the metrics row of the steps since the last one (all ranks' pairs); returns the new
    window start. A window of only skipped steps has nothing to report."""
    reduced = run.window.reduce()
    if reduced["pairs"] == 0:
        return window_start
    reduced = margin_length_correlation(reduced)
    elapsed = time.perf_counter() - window_start
    grad_norm = run.engine.get_global_grad_norm()
    world_size = run.dist.world_size
    row = {
        "step": step,
        "total_steps": run.total_steps,  # progress and ETA for whoever watches the file
        "epoch": run.epoch(),
        **{name: reduced[name] for name in reduced if name not in ("pairs", "tokens", "slots")},
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "pairs": reduced["pairs"],  # of this window, all ranks
        "tokens": reduced["tokens"],  # of this window, all ranks (prompt once per pair)
        "pairs_per_s": reduced["pairs"] / elapsed,
        "tokens_per_s": reduced["tokens"] / elapsed,
        # the share of computed positions that were padding (train.pad_to_multiple_of, group_by_length)
        "padding_fraction": 1.0 - reduced["tokens"] / reduced["slots"] if reduced["slots"] else None,
        "pairs_per_s_per_rank": reduced["pairs"] / elapsed / world_size,
        "world_size": world_size,
        "global_batch": run.ds_config["train_batch_size"],
        "peak_memory_gb": peak_memory_bytes() / 2**30,
    }
    run.log(RowKind.TRAIN, row)
    run.warn(run.monitors.observe_train(row))
    progress.set_postfix(
        loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}", pairs_s=f"{row['pairs_per_s']:.2f}"
    )
    return time.perf_counter()


def save(run: Run, step: int, is_best: bool = False) -> Path:
    """A checkpoint of everything an exact resume needs, with the step's adapter; every rank calls it.
    `is_best`: recorded as the best checkpoint (before its row, which is what readers watch)."""
    trainer_state = {
        "step": step,
        "position": run.batches.position,
        "reward_sums": run.reward_sums,
        "bad_in_row": run.guard.bad_in_row,
        "results": run.results,
        "config": to_dict(run.config),
        "world_size": run.dist.world_size,
        "best": run.best.state() if run.best is not None else None,
        "monitors": run.monitors.state_dict(),
    }
    rank_state = {"window": run.window.state()}
    if run.config.dpo.sync_reference_every:  # the moving reference as it is at this step
        rank_state["reference"] = reference_state(run.engine.module)
    path = save_checkpoint(
        run.engine,
        run.output_dir,
        step,
        trainer_state,
        rank_state,
        run.dist,
        run.config.train.keep_checkpoints,
        run.save_adapter,
        keep_step=run.best.step if run.best is not None else None,
    )
    if is_best and run.dist.is_main:
        rundir.write_best(run.output_dir, step, run.best.metric, run.best.score)
    run.log(RowKind.CHECKPOINT, {"step": step, "checkpoint": str(path)})
    return path


def optimizer_step(engine, stream, config: Config, guard: NumericGuard, trainable, device, bco_delta: float):
    """One optimizer step over `grad_accum` micro-batches. Nothing in it reads a value back from the
    device until DeepSpeed's step does: whether a loss was finite is kept as a device flag, read
    only when the step was skipped.

    Returns (per-micro-batch (stats, tokens), skip reason or None, the bad rows of all ranks).
    """
    micro_stats, bad_flags, rows = [], [], []
    skipped_before = engine.skipped_steps
    for micro in range(config.train.grad_accum):
        host_batch = next(stream)
        batch = to_device(host_batch, device)
        loss, stats = preference_step(engine, batch, config.dpo, bco_delta=bco_delta)
        bad_flags.append(guard.loss_is_bad(loss))
        rows.append(host_batch["row_index"])
        if micro == config.train.grad_accum - 1:
            any_bad = any_rank_flag(torch.stack(bad_flags).any())
            loss = guard.poison(loss, any_bad)
        engine.backward(loss)
        if micro == config.train.grad_accum - 1:
            guard.flag_overflow_at_zero0(engine, trainable)
        engine.step()
        micro_stats.append((stats, batch[HOST]))
    if engine.skipped_steps == skipped_before:
        return micro_stats, None, []
    if not bool(any_bad) and engine.fp16_enabled():
        return micro_stats, LOSS_SCALE_OVERFLOW, []  # the scaler lowers its scale and goes on
    bad_rows = [row for flag, micro_rows in zip(bad_flags, rows, strict=True) if flag for row in micro_rows.tolist()]
    return micro_stats, "loss" if bool(any_bad) else "gradient norm", gather_lists(bad_rows)


def _reward_sums(micro_stats) -> list[float]:
    """(sum, count) of all chosen and rejected rewards of a step on all ranks (bco_pair's baseline)."""
    rewards = torch.cat([s[k] for s, _ in micro_stats for k in ("rewards/chosen", "rewards/rejected")])
    total = all_reduce_sum(torch.tensor([rewards.sum().item(), rewards.numel()], dtype=torch.float64))
    return total.tolist()


def _plot_if_possible(output_dir: Path) -> None:
    """Charts at the end of training when matplotlib (an optional extra) is installed."""

    try:
        plot_run(output_dir)
    except UserError:
        pass  # no matplotlib: `pip install dpo-lora[plot]`, then `dpo-lora plot RUN_DIR`
