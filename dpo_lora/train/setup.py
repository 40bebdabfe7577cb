"""Everything a run needs before its first optimizer step, in one `Run`: the process group, data,
batches, the DeepSpeed engine, the batch layout (self-checked), eval, the reference, the metrics
writer, and the state restored from a checkpoint or started fresh (with the eval before training)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dpo_lora.core import rundir
from dpo_lora.core.build_locks import clear_stale_build_locks
from dpo_lora.core.config import dump_yaml, to_dict
from dpo_lora.core.cpu_memory import cap_heap_fragmentation
from dpo_lora.core.distributed import barrier, gather_lists, gathered, init_distributed
from dpo_lora.core.dsconfig import fill_deepspeed_config, size_buckets
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import RowKind
from dpo_lora.core.schema import Config
from dpo_lora.data.batches import PairBatches, pair_lengths
from dpo_lora.data.layout import batch_layout
from dpo_lora.data.prepare import prepare_splits
from dpo_lora.model import chunked_logps, fitting, precision
from dpo_lora.model.fused_lora import fuse
from dpo_lora.model.load import attach_adapter, load_base, load_tokenizer
from dpo_lora.model.moving_reference import add_reference_copy, load_reference_state
from dpo_lora.model.regional_compile import compile_layers
from dpo_lora.model.zero3_loading import gather_dora_base_weights
from dpo_lora.train.best import BestTracker
from dpo_lora.train.checkpoints import clear_run, load_checkpoint, resume_point
from dpo_lora.train.evaluation import EvalShard, evaluate
from dpo_lora.train.guards import NumericGuard, SkippableAdamW
from dpo_lora.train.metrics import MetricsWriter, MetricWindow, train_metrics
from dpo_lora.train.monitors import HealthMonitors
from dpo_lora.train.reference import reference_choice, with_reference_logps
from dpo_lora.train.self_check import self_check


@dataclass
class Run:
    config: Config
    dist: object
    output_dir: Path
    ds_config: dict
    tokenizer: object
    batches: PairBatches
    total_steps: int
    engine: object
    scheduler: object
    trainable: list
    eval_loader: object | None
    writer: MetricsWriter | None  # rank 0 only
    window: MetricWindow = field(default_factory=MetricWindow)
    guard: NumericGuard | None = None
    best: BestTracker | None = None  # with held-out pairs and a train.best_metric
    monitors: HealthMonitors | None = None
    results: dict = field(default_factory=dict)  # eval metrics: before, latest, after
    reward_sums: list = field(default_factory=lambda: [0.0, 0.0])  # all rewards so far: bco_pair's baseline
    start_step: int = 0

    def log(self, kind: RowKind, row: dict) -> None:
        if self.writer is not None:
            self.writer.write({**row, "kind": kind.value})

    def warn(self, warnings: list) -> None:
        """Each health warning as a metrics row and, on rank 0, one console line."""
        for warning in warnings:
            row = {"step": warning.step, "monitor": warning.monitor, "message": warning.message, **warning.values}
            self.log(RowKind.HEALTH, row)
            if self.dist.is_main:
                from tqdm.auto import tqdm

                tqdm.write(f"dpo-lora: warning: {warning.message}", file=sys.stderr)

    def epoch(self) -> float:
        return round(self.batches.position / self.batches.per_epoch, 4)

    def bco_delta(self) -> float:
        return self.reward_sums[0] / self.reward_sums[1] if self.reward_sums[1] else 0.0

    def evaluate(self, policy_is_reference: bool = False) -> dict:
        return evaluate(self.engine, self.eval_loader, self.config.dpo, self.dist.device, policy_is_reference)

    def save_adapter(self, folder: Path) -> None:
        """The PEFT adapter (and tokenizer) as `PeftModel.from_pretrained` reads it; every rank calls it."""
        with gathered(self.trainable):  # ZeRO-3 holds a shard of the adapter on each rank
            if self.dist.is_main:
                self.engine.module.save_pretrained(str(folder), selected_adapters=["default"])
                self.tokenizer.save_pretrained(str(folder))


def setup_run(config: Config) -> Run:

    clear_stale_build_locks()  # DeepSpeed's kernel builds would wait on a killed build's lock forever
    dist = init_distributed(config.train.collective_timeout_s)
    config = fitting.resolve_auto(config, dist.device, dist.world_size, announce=dist.is_main)
    native_everywhere = all(gather_lists([precision.bf16_is_native(dist.device.type)]))  # the ranks agree
    config = replace(config, model=precision.resolved(config.model, native_everywhere))
    train_cfg = config.train
    if dist.device.type == "cpu":
        cap_heap_fragmentation(train_cfg.cpu_mmap_threshold_mb)
    output_dir = Path(config.output_dir)
    ds_config = fill_deepspeed_config(config, dist.world_size)
    resume_from = resume_point(config, output_dir, dist.world_size)
    if dist.is_main and resume_from is None:
        clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    # Before the model loads: a W&B that can't start (no package, no key) fails the run at once.
    writer = MetricsWriter(output_dir, config.wandb, to_dict(config)) if dist.is_main else None
    barrier()

    tokenizer = load_tokenizer(config.model)
    # Rank 0 tokenizes first and fills the cache; the others then read it.
    if not dist.is_main:
        barrier()
    train_set, eval_set = prepare_splits(config.data, tokenizer, train_cfg.seed, output_dir if dist.is_main else None)
    if dist.is_main:
        barrier()
    check_data_kind(config, train_set, eval_set)

    batches = PairBatches(
        train_set,
        micro_batch_size=train_cfg.micro_batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=train_cfg.seed,
        collate=None,
        lengths=pair_lengths(train_set) if config.data.group_by_length else None,
        global_batch=ds_config["train_batch_size"],
    )
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
    if eval_set is not None and config.dpo.uses_reference:
        # Every eval scores the same pairs against the same reference: score them once (cached).
        eval_set = with_reference_logps(engine, eval_set, config, collate, dist)
    if eval_set is not None:
        eval_shard = EvalShard(eval_set, dist.rank, dist.world_size)
        eval_loader = torch.utils.data.DataLoader(eval_shard, batch_size=train_cfg.eval_batch_size, collate_fn=collate)
    reference, why = reference_choice(config.dpo, total_steps * ds_config["train_batch_size"], len(train_set))
    if reference == "precompute":
        batches.dataset = _precomputed(engine, train_set, config, collate, dist, why)
    elif dist.is_main and reference == "online":
        print(f"dpo-lora: reference online ({why})", file=sys.stderr)
    elif dist.is_main:
        print(f"dpo-lora: no reference forward runs ({why})", file=sys.stderr)
    run = Run(
        config=config,
        dist=dist,
        output_dir=output_dir,
        ds_config=ds_config,
        tokenizer=tokenizer,
        batches=batches,
        total_steps=total_steps,
        engine=engine,
        scheduler=scheduler,
        trainable=trainable,
        eval_loader=eval_loader,
        writer=writer,
        guard=NumericGuard(train_cfg.max_bad_steps),
        window=MetricWindow(train_metrics(config.dpo)),
        monitors=HealthMonitors(config.monitor, has_reference=config.dpo.uses_reference),
        best=BestTracker(train_cfg.best_metric)
        if eval_loader is not None and train_cfg.best_metric != "none"
        else None,
    )
    _resume_or_begin(run, resume_from)
    return run


def check_data_kind(config: Config, train_set, eval_set) -> None:
    """Unpaired rows ({prompt, completion, label}) train dpo.loss kto, and kto trains on nothing else."""
    kto = "kto" in config.dpo.names
    for key, dataset in (("data.train", train_set), ("data.eval", eval_set)):
        if dataset is None:
            continue
        unpaired = "label" in dataset.column_names
        if unpaired and not kto:
            raise UserError(f"{key} holds unpaired rows (prompt, completion, label): they train dpo.loss kto")
        if kto and not unpaired:
            raise UserError(f"dpo.loss kto trains on unpaired rows (prompt, completion, label); {key} holds pairs")


def _precomputed(engine, train_set, config, collate, dist, why: str):
    """The training set with its reference log-probs, saying what they cost up front."""
    started = time.perf_counter()
    scored = with_reference_logps(engine, train_set, config, collate, dist)
    if dist.is_main:
        seconds = time.perf_counter() - started
        print(
            f"dpo-lora: reference precompute ({why}): {len(train_set)} pairs in {seconds:.1f} s up front (less when cached)",
            file=sys.stderr,
        )
    return scored


def _resume_or_begin(run: Run, resume_from: Path | None) -> None:
    """Restore step, data position, metric window and eval results; or write the config and run
    the eval before training."""
    if resume_from is not None:
        state, rank_state = load_checkpoint(run.engine, resume_from, run.dist.rank)
        run.start_step, run.batches.position, run.reward_sums = state["step"], state["position"], state["reward_sums"]
        run.guard.bad_in_row, run.results = state["bad_in_row"], state["results"]
        if run.best is not None and state.get("best"):  # checkpoints from before best_metric hold none
            run.best = BestTracker.from_state({**state["best"], "metric": run.best.metric})
        if state.get("monitors"):
            run.monitors.load_state_dict(state["monitors"])
        run.window.load_state(rank_state["window"])
        if "reference" in rank_state:  # dpo.sync_reference_every: the reference as it was at that step
            load_reference_state(run.engine.module, rank_state["reference"])
        if run.writer is not None:
            run.writer.truncate_after(run.start_step)
            print(f"dpo-lora: resuming from {resume_from} (step {run.start_step} of {run.total_steps})")
        return
    if run.dist.is_main:
        (run.output_dir / rundir.CONFIG).write_text(dump_yaml(run.config))
    if run.eval_loader is not None:
        # Before any update the policy is the reference (zero LoRA B, or the init adapter itself).
        run.results["before"] = run.evaluate(policy_is_reference=True)
        run.log(RowKind.EVAL, {"step": 0, "epoch": 0.0, **run.results["before"]})
        run.monitors.observe_eval(0, run.results["before"])  # held-out accuracy's starting point


def _build_engine(config: Config, dist, ds_config: dict, total_steps: int):
    """(engine, lr scheduler, trainable parameters) with AdamW and warmup + schedule from the YAML."""
    import deepspeed
    from transformers import get_scheduler, set_seed

    train_cfg = config.train
    set_seed(train_cfg.seed)  # same LoRA init on every rank
    model = attach_adapter(load_base(config.model, dist.device, ds_config), config.lora)
    if config.dpo.sync_reference_every:
        add_reference_copy(model)  # TR-DPO: the reference adapter the loop syncs
    if config.lora.dora and ds_config["zero_optimization"]["stage"] == 3:
        gather_dora_base_weights(model)
    if config.model.fused_lora and (fused := fuse(model, config.model, ds_config["zero_optimization"]["stage"])):
        if dist.is_main:
            print(f"dpo-lora: model.fused_lora: {fused} 4-bit LoRA layers run as one function each", file=sys.stderr)
    if config.model.compile == "layers" and (
        compiled := compile_layers(model, ds_config["zero_optimization"]["stage"])
    ):
        if dist.is_main:
            print(f"dpo-lora: model.compile: {compiled} decoder layers compile on first use", file=sys.stderr)
    chunked_logps.install(model, train_cfg.logps_chunk_size)  # before DeepSpeed wraps the head
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_config = size_buckets(ds_config, sum(getattr(p, "ds_numel", p.numel()) for p in trainable))
    adamw = _adamw(ds_config["zero_optimization"])
    optimizer = adamw(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if adamw is SkippableAdamW and not ds_config["fp16"]["enabled"]:
        # ZeRO-0 clips in the optimizer, as ZeRO-1/2 do (see SkippableAdamW); fp16 keeps
        # DeepSpeed's loss-scaling optimizer, which unscales before it clips.
        optimizer.max_grad_norm = ds_config["gradient_clipping"]
        ds_config = {**ds_config, "gradient_clipping": 0.0}
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
