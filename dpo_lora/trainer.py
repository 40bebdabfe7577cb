"""The DPO training loop on the DeepSpeed engine.

Per optimizer step: micro-batches -> reference log-probs (adapter off, no grad) -> policy log-probs
-> loss -> backward -> step -> log; evaluation before training, every `train.eval_every` steps and
after; checkpoints every `train.save_every` steps, at the end and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from dpo_lora import chunked_logps
from dpo_lora.batches import PairBatches, pair_lengths
from dpo_lora.checkpoint import clear_run, load_checkpoint, resume_point, save_checkpoint
from dpo_lora.config import Config, dump_yaml, to_dict
from dpo_lora.cpu_memory import cap_heap_fragmentation
from dpo_lora.distributed import all_reduce_sum, any_rank, barrier, gather_lists, gathered, peak_memory_bytes
from dpo_lora.errors import UserError
from dpo_lora.evaluation import EvalShard, evaluate, to_device
from dpo_lora.guards import LOSS_SCALE_OVERFLOW, NumericGuard, SkippableAdamW, StopRequest
from dpo_lora.layout import batch_layout
from dpo_lora.metrics import MetricsWriter, MetricWindow
from dpo_lora.self_check import self_check
from dpo_lora.step import preference_step

ADAPTER_DIR = "adapter"


def _build_engine(config: Config, dist, ds_config: dict, total_steps: int):
    """(engine, lr scheduler, trainable parameters) with AdamW and warmup + schedule from the YAML."""
    import deepspeed
    from transformers import get_scheduler, set_seed

    from dpo_lora.model import attach_adapter, load_base

    train_cfg = config.train
    set_seed(train_cfg.seed)  # same LoRA init on every rank
    model = attach_adapter(load_base(config.model, dist.device), config.lora)
    chunked_logps.install(model, train_cfg.logps_chunk_size)  # before DeepSpeed wraps the head
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(ds_config["zero_optimization"])(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    schedule = {"constant": "constant_with_warmup"}.get(train_cfg.scheduler, train_cfg.scheduler)
    warmup = int(train_cfg.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps),
    )
    set_seed(train_cfg.seed + dist.rank)  # dropout differs across ranks, as in data-parallel training
    return engine, scheduler, [p for p in engine.module.parameters() if p.requires_grad]


def _adamw(zero: dict):
    """The AdamW class each ZeRO setup needs (same update rule and defaults in all three)."""
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # the optimizer steps on the CPU: use its fused kernel

        return DeepSpeedCPUAdam
    # ZeRO >= 1 skips non-finite steps itself and accepts only the optimizer classes it knows.
    return SkippableAdamW if zero.get("stage", 0) == 0 else torch.optim.AdamW


def optimizer_step(engine, stream, config: Config, guard: NumericGuard, trainable, device, bco_delta: float):
    """One optimizer step over `grad_accum` micro-batches.

    Returns (per-micro-batch (stats, tokens), skip reason or None, the bad rows of all ranks).
    """
    micro_stats, bad_rows, loss_bad = [], [], False
    skipped_before = engine.skipped_steps
    for micro in range(config.train.grad_accum):
        batch = to_device(next(stream), device)
        loss, stats = preference_step(engine, batch, config.dpo, bco_delta=bco_delta)
        if guard.loss_is_bad(loss):
            bad_rows += batch["row_index"].tolist()
        boundary = micro == config.train.grad_accum - 1
        if boundary:
            loss_bad = any_rank(bool(bad_rows))
            if loss_bad:
                loss = guard.poison(loss, trainable)
        engine.backward(loss)
        if boundary:
            guard.flag_overflow_at_zero0(engine, trainable)
        engine.step()
        micro_stats.append((stats, int(batch["attention_mask"].sum())))
    if engine.skipped_steps == skipped_before:
        return micro_stats, None, []
    if not loss_bad and engine.fp16_enabled():
        return micro_stats, LOSS_SCALE_OVERFLOW, []  # the scaler lowers its scale and goes on
    return micro_stats, "loss" if loss_bad else "gradient norm", gather_lists(bad_rows)


def _reward_sums(micro_stats) -> list[float]:
    """(sum, count) of all chosen and rejected rewards of a step on all ranks (bco_pair's baseline)."""
    rewards = torch.cat([s[k] for s, _ in micro_stats for k in ("rewards/chosen", "rewards/rejected")])
    total = all_reduce_sum(torch.tensor([rewards.sum().item(), rewards.numel()], dtype=torch.float64))
    return total.tolist()


def train(config: Config) -> dict:
    """Train the adapter. Returns {"before", "after": eval metrics, "steps": n, "stopped": bool}."""
    from tqdm.auto import tqdm

    from dpo_lora.distributed import init_distributed
    from dpo_lora.dsconfig import fill_deepspeed_config
    from dpo_lora.model import load_tokenizer
    from dpo_lora.prepare import prepare_splits

    dist = init_distributed()
    train_cfg = config.train
    if dist.device.type == "cpu":
        cap_heap_fragmentation(train_cfg.cpu_mmap_threshold_mb)
    output_dir = Path(config.output_dir)
    ds_config = fill_deepspeed_config(config, dist.world_size)
    resume_from = resume_point(config, output_dir, dist.world_size)
    if dist.is_main and resume_from is None:
        clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    tokenizer = load_tokenizer(config.model)
    # Rank 0 tokenizes first and fills the cache; the others then read it.
    if not dist.is_main:
        barrier()
    train_set, eval_set = prepare_splits(config.data, tokenizer, train_cfg.seed, output_dir if dist.is_main else None)
    if dist.is_main:
        barrier()

    batches = PairBatches(
        train_set, micro_batch_size=train_cfg.micro_batch_size, rank=dist.rank, world_size=dist.world_size,
        seed=train_cfg.seed, collate=None, lengths=pair_lengths(train_set) if config.data.group_by_length else None,
        global_batch=ds_config["train_batch_size"],
    )  # fmt: skip
    steps_per_epoch = batches.per_epoch // train_cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"{config.data.train}: {len(train_set)} pairs are fewer than one global batch "
            f"({ds_config['train_batch_size']} = micro_batch_size x grad_accum x {dist.world_size} ranks)"
        )
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.epochs * steps_per_epoch)

    engine, scheduler, trainable = _build_engine(config, dist, ds_config, total_steps)
    collate, notices = batch_layout(config, engine.module, tokenizer.pad_token_id)
    if train_cfg.self_check:
        first = [train_set[i] for i in range(min(train_cfg.micro_batch_size, len(train_set)))]
        collate, failed = self_check(engine, first, collate, tokenizer.pad_token_id, dist.device)
        notices += failed
    batches.collate = collate
    for notice in notices if dist.is_main else []:
        print(f"dpo-lora: {notice}", file=sys.stderr)
    eval_loader = None
    if eval_set is not None:
        eval_shard = EvalShard(eval_set, dist.rank, dist.world_size)
        eval_loader = torch.utils.data.DataLoader(eval_shard, batch_size=train_cfg.eval_batch_size, collate_fn=collate)
    if config.dpo.reference == "precompute" and not config.dpo.reference_free:
        from dpo_lora.reference import with_reference_logps

        batches.dataset = with_reference_logps(engine, train_set, config, collate, dist)
    writer = MetricsWriter(output_dir) if dist.is_main else None
    window, guard, results = MetricWindow(), NumericGuard(train_cfg.max_bad_steps), {}
    reward_sums = [0.0, 0.0]  # all rewards so far (sum, count): bco_pair's baseline
    start_step = 0

    def log(row: dict) -> None:
        if writer is not None:
            writer.write(row)

    def epoch() -> float:
        return round(batches.position / batches.per_epoch, 4)

    if resume_from is not None:
        state, rank_state = load_checkpoint(engine, resume_from, dist.rank)
        start_step, batches.position, reward_sums = state["step"], state["position"], state["reward_sums"]
        guard.bad_in_row, results = state["bad_in_row"], state["results"]
        window.load_state(rank_state["window"])
        if writer is not None:
            writer.truncate_after(start_step)
            print(f"dpo-lora: resuming from {resume_from} (step {start_step} of {total_steps})")
    else:
        if dist.is_main:
            (output_dir / "config.yaml").write_text(dump_yaml(config))
        if eval_loader is not None:
            results["before"] = evaluate(engine, eval_loader, config.dpo, dist.device)
            log({"step": 0, "epoch": 0.0, **results["before"]})

    def save_adapter(folder: Path) -> None:
        """The PEFT adapter (and tokenizer) as `PeftModel.from_pretrained` reads it; every rank calls it."""
        with gathered(trainable):  # ZeRO-3 holds a shard of the adapter on each rank
            if dist.is_main:
                engine.module.save_pretrained(str(folder), selected_adapters=["default"])
                tokenizer.save_pretrained(str(folder))

    stop = StopRequest()
    stream = iter(batches)
    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=not dist.is_main, dynamic_ncols=True)
    window_start = time.perf_counter()
    engine.train()
    stopped = False
    for step in range(start_step + 1, total_steps + 1):
        lr = scheduler.get_last_lr()[0]
        bco_delta = reward_sums[0] / reward_sums[1] if reward_sums[1] else 0.0
        micro_stats, skip_reason, bad_rows = optimizer_step(
            engine, stream, config, guard, trainable, dist.device, bco_delta
        )
        if guard.record(step, skip_reason, bad_rows):
            log({"step": step, "epoch": epoch(), "skipped": skip_reason, "rows": bad_rows})
        else:
            for stats, tokens in micro_stats:
                window.add(stats, tokens)
            if config.dpo.loss == "bco_pair":
                reward_sums = [a + b for a, b in zip(reward_sums, _reward_sums(micro_stats), strict=True)]

        reduced = window.reduce() if step % train_cfg.log_every == 0 or step == total_steps else {"pairs": 0}
        if reduced["pairs"] > 0:  # a window of only skipped steps has nothing to report
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step,
                "epoch": epoch(),
                **{name: reduced[name] for name in reduced if name not in ("pairs", "tokens")},
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "pairs_per_s": reduced["pairs"] / elapsed,
                "tokens": reduced["tokens"],  # of this window, all ranks (prompt once per pair)
                "tokens_per_s": reduced["tokens"] / elapsed,
                "pairs_per_s_per_rank": reduced["pairs"] / elapsed / dist.world_size,
                "world_size": dist.world_size,
                "global_batch": ds_config["train_batch_size"],
                "peak_memory_gb": peak_memory_bytes() / 2**30,
            }
            log(row)
            progress.set_postfix(
                loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}", pairs_s=f"{row['pairs_per_s']:.2f}"
            )
            window_start = time.perf_counter()
        progress.update(1)

        last = step == total_steps
        if eval_loader is not None and (last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)):
            metrics = evaluate(engine, eval_loader, config.dpo, dist.device)
            results["after" if last else "latest"] = metrics
            log({"step": step, "epoch": epoch(), **metrics})
            window_start = time.perf_counter()
        stopped = stop.agreed()
        if stopped or last or (train_cfg.save_every and step % train_cfg.save_every == 0):
            trainer_state = {
                "step": step, "position": batches.position, "reward_sums": reward_sums,
                "bad_in_row": guard.bad_in_row, "results": results, "config": to_dict(config),
                "world_size": dist.world_size,
            }  # fmt: skip
            rank_state = {"window": window.state()}
            path = save_checkpoint(
                engine, output_dir, step, trainer_state, rank_state, dist, train_cfg.keep_checkpoints, save_adapter
            )
            log({"step": step, "checkpoint": str(path)})
        if stopped:
            if dist.is_main:
                print(f"\ndpo-lora: stopped at step {step}; checkpoint {path}; continue with --resume")
            break
    progress.close()
    stop.restore()

    if not stopped:
        save_adapter(output_dir / ADAPTER_DIR)
    if writer is not None:
        writer.close()
        _plot_if_possible(output_dir)
    barrier()
    return {**results, "steps": total_steps, "stopped": stopped}


def _plot_if_possible(output_dir: Path) -> None:
    """Charts at the end of training when matplotlib (an optional extra) is installed."""
    from dpo_lora.plots import plot_run

    try:
        plot_run(output_dir)
    except UserError:
        pass  # no matplotlib: `pip install dpo-lora[plot]`, then `dpo-lora plot RUN_DIR`
