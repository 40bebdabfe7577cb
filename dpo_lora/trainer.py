"""The DPO training loop on the DeepSpeed engine.

batch -> reference log-probs (adapter off, no grad) -> policy log-probs -> loss -> backward
-> step -> log; evaluation before training, every `train.eval_every` steps, and after.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import torch

from dpo_lora.config import Config, dump_yaml
from dpo_lora.errors import UserError
from dpo_lora.metrics import MetricsWriter, MetricWindow
from dpo_lora.step import preference_step
from dpo_lora.tokenization import collate_pairs

ADAPTER_DIR = "adapter"


class EvalShard(torch.utils.data.Dataset):
    """This rank's share of the eval set. Every rank gets the same number of items (collectives
    stay in step); the padding items repeat real ones with weight 0 so no pair counts twice."""

    def __init__(self, dataset, rank: int, world_size: int) -> None:
        self.dataset = dataset
        padded = math.ceil(len(dataset) / world_size) * world_size
        self.items = [(i % len(dataset), float(i < len(dataset))) for i in range(rank, padded, world_size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        index, weight = self.items[i]
        return {**self.dataset[index], "weight": weight}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _epochs_of_batches(loader, sampler):
    """Endless (epoch, batch) stream; each epoch reshuffles through the seeded sampler."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def evaluate(engine, loader, dpo_config, device) -> dict[str, float]:
    """Pair metrics over the whole eval set (all ranks), with `eval/` names."""
    engine.eval()
    window = MetricWindow()
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, device)
            _, stats = preference_step(engine, batch, dpo_config)
            window.add(stats, tokens=int(batch["attention_mask"].sum()), weight=batch["weight"])
    engine.train()
    reduced = window.reduce()
    return {f"eval/{name}": value for name, value in reduced.items() if name not in ("tokens",)}


def _make_scheduler(train_config, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(train_config.scheduler, train_config.scheduler)
    warmup = int(train_config.warmup_ratio * total_steps)
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _quiet_third_party() -> None:
    """Keep the console to dpo-lora's own progress: these messages are not actionable for a user."""
    import warnings

    from transformers.utils import logging as hf_logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional `kernels` package
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def train(config: Config) -> dict:
    """Train the adapter; returns {"before": eval metrics, "after": eval metrics, "steps": n}."""
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm
    from transformers import set_seed

    from dpo_lora.data import prepare_splits
    from dpo_lora.distributed import barrier, init_distributed
    from dpo_lora.dsconfig import fill_deepspeed_config
    from dpo_lora.model import attach_adapter, load_base, load_tokenizer

    _quiet_third_party()
    dist = init_distributed()
    train_cfg = config.train
    output_dir = Path(config.output_dir)
    ds_config = fill_deepspeed_config(config, dist.world_size)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump_yaml(config))
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)

    tokenizer = load_tokenizer(config.model)
    # Rank 0 tokenizes first and fills the datasets cache; the others then read it.
    if not dist.is_main:
        barrier()
    train_set, eval_set = prepare_splits(config.data, tokenizer, train_cfg.seed)
    if dist.is_main:
        barrier()

    collate = functools.partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    sampler = DistributedSampler(
        train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=train_cfg.seed, drop_last=True
    )
    train_loader = DataLoader(
        train_set, batch_size=train_cfg.micro_batch_size, sampler=sampler, collate_fn=collate, drop_last=True
    )
    steps_per_epoch = len(train_loader) // train_cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"{config.data.train}: {len(train_set)} pairs are fewer than one global batch "
            f"({ds_config['train_batch_size']} = micro_batch_size x grad_accum x {dist.world_size} ranks)"
        )
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.epochs * steps_per_epoch)
    eval_loader = None
    if eval_set is not None:
        eval_shard = EvalShard(eval_set, dist.rank, dist.world_size)
        eval_loader = DataLoader(eval_shard, batch_size=train_cfg.eval_batch_size, collate_fn=collate)

    set_seed(train_cfg.seed)  # same LoRA init on every rank
    model = attach_adapter(load_base(config.model, dist.device), config.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=_make_scheduler(train_cfg, total_steps)
    )
    set_seed(train_cfg.seed + dist.rank)  # dropout differs across ranks, as in data-parallel training

    writer = MetricsWriter(output_dir) if dist.is_main else None
    results = {}

    def log(row: dict) -> None:
        if writer is not None:
            writer.write(row)

    if eval_loader is not None:
        results["before"] = evaluate(engine, eval_loader, config.dpo, dist.device)
        log({"step": 0, "epoch": 0.0, **results["before"]})

    batches = _epochs_of_batches(train_loader, sampler)
    window = MetricWindow()
    progress = tqdm(total=total_steps, desc="dpo", disable=not dist.is_main, dynamic_ncols=True)
    window_start = time.perf_counter()
    engine.train()
    for step in range(1, total_steps + 1):
        lr = scheduler.get_last_lr()[0]
        for _ in range(train_cfg.grad_accum):
            epoch, batch = next(batches)
            batch = _to_device(batch, dist.device)
            loss, stats = preference_step(engine, batch, config.dpo)
            engine.backward(loss)
            engine.step()
            window.add(stats, tokens=int(batch["attention_mask"].sum()))

        if step % train_cfg.log_every == 0 or step == total_steps:
            reduced = window.reduce()
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                **{name: reduced[name] for name in reduced if name not in ("pairs", "tokens")},
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "pairs_per_s": reduced["pairs"] / elapsed,
                "tokens_per_s": reduced["tokens"] / elapsed,
            }
            log(row)
            progress.set_postfix(
                loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}", pairs_s=f"{row['pairs_per_s']:.2f}"
            )
            window_start = time.perf_counter()
        progress.update(1)

        if eval_loader is not None and train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < total_steps:
            log(
                {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    **evaluate(engine, eval_loader, config.dpo, dist.device),
                }
            )
            window_start = time.perf_counter()
    progress.close()

    if eval_loader is not None:
        results["after"] = evaluate(engine, eval_loader, config.dpo, dist.device)
        log({"step": total_steps, "epoch": round(total_steps / steps_per_epoch, 4), **results["after"]})
    if dist.is_main:
        engine.module.save_pretrained(str(output_dir / ADAPTER_DIR), selected_adapters=["default"])
        tokenizer.save_pretrained(str(output_dir / ADAPTER_DIR))
        writer.close()
    barrier()
    results["steps"] = total_steps
    return results
