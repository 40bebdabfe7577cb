"""What fits where, by the plan: the shipped ZeRO configuration that fits a run on 1, 2, 4 and 8
GPUs of one size (`dpo-lora plan`'s cluster table, `by_gpus` in its JSON), and the smallest change
that makes a run fit when it does not.

The shipped configurations (deepspeed_configs/, as dpo_lora.core.dsconfig.zero_config writes them)
are tried cheapest first: ZeRO-2 replicates the base and is the least communication; ZeRO-3 shards
it; offloading moves the optimizer (ZeRO-2) or the parameters too (ZeRO-3) to host memory, which
costs a transfer per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpo_lora.core.dsconfig import zero_config
from dpo_lora.model.fitting import largest_fitting
from dpo_lora.model.memory_plan import Plan, plan, zero_settings
from dpo_lora.model.weight_plan import ZeroSettings

GPU_COUNTS = (1, 2, 4, 8)
SHIPPED = {  # file -> (stage, offload), cheapest first
    "zero2.json": (2, False),
    "zero3.json": (3, False),
    "zero2_offload.json": (2, True),
    "zero3_offload.json": (3, True),
}


def shipped(name: str) -> ZeroSettings:
    return ZeroSettings.of(zero_config(*SHIPPED[name])["zero_optimization"])


@dataclass(frozen=True)
class Fit:
    """The first shipped configuration that fits `gpus` GPUs, or the one that comes closest."""

    gpus: int
    deepspeed: str  # deepspeed_configs/<file>
    fits: bool
    plan: Plan

    def as_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "deepspeed": self.deepspeed,
            "fits": self.fits,
            "per_rank_bytes": self.plan.total_bytes,
            "host_bytes_per_rank": self.plan.host_bytes,
        }


def memory_safe(config):
    """`config` with an unresolved `model.checkpoint_layers: auto` as every layer (what it plans as)."""
    if config.model.checkpoint_layers != "auto":
        return config
    return replace(config, model=replace(config.model, checkpoint_layers="all"))


def first_fitting(config, budget: int, gpus: int, skip: ZeroSettings | None = None) -> Fit:
    """The cheapest shipped ZeRO configuration whose plan on `gpus` ranks fits `budget` bytes each
    (other than `skip`); when none does, the one with the smallest per-rank total."""
    config = memory_safe(config)
    closest = None
    for name in SHIPPED:
        zero = shipped(name)
        if skip is not None and _same(zero, skip):
            continue
        planned = plan(config, world_size=gpus, zero=zero)
        fit = Fit(gpus, f"deepspeed_configs/{name}", planned.total_bytes <= budget, planned)
        if fit.fits:
            return fit
        if closest is None or planned.total_bytes < closest.plan.total_bytes:
            closest = fit
    return closest


def by_gpus(config, budget: int) -> list[Fit]:
    """The cluster table: for 1, 2, 4 and 8 GPUs of `budget` bytes, what fits."""
    return [first_fitting(config, budget, gpus) for gpus in GPU_COUNTS]


def cluster_table(fits: list[Fit], budget: int) -> list[str]:
    lines = [f"on GPUs of {budget / 2**30:.0f} GiB (the shipped ZeRO configurations, cheapest first):"]
    for fit in fits:
        host = f", host {fit.plan.host_bytes / 2**30:.1f} GiB per rank" if fit.plan.host_bytes else ""
        verdict = fit.deepspeed if fit.fits else f"nothing fits (closest: {fit.deepspeed})"
        lines.append(f"  {fit.gpus} GPU{'s' if fit.gpus > 1 else ' '}  {verdict:<44}"
                     f"{fit.plan.total_bytes / 2**30:>7.2f} GiB per rank{host}")  # fmt: skip
    return lines


def smallest_change(config, planned: Plan, budget: int, world_size: int) -> str:
    """One line naming the smallest changes that make `config`'s run on `world_size` ranks fit
    `budget` bytes each, never what it already does. Tried in this order, each kept while the run
    still does not fit: gradient checkpointing; a smaller micro-batch (the same batch through
    accumulation); another shipped ZeRO configuration on the same GPUs; 4-bit quantization; more
    GPUs; last a shorter data.max_length, the only one that changes what is trained."""
    config = memory_safe(config)
    current = zero_settings(config)
    changes = []

    def advice(fit_plan: Plan) -> str:
        host = f"; {fit_plan.host_bytes / 2**30:.1f} GiB of host memory per rank" if fit_plan.host_bytes else ""
        return f"{', '.join(changes)} ({fit_plan.total_bytes / 2**30:.2f} GiB per rank{host})"

    if not config.model.gradient_checkpointing:
        config = replace(config, model=replace(config.model, gradient_checkpointing=True, checkpoint_layers="all"))
        changes.append("model.gradient_checkpointing=true")
        if (planned := plan(config, world_size, zero=current)).total_bytes <= budget:
            return advice(planned)
    if config.train.micro_batch_size > 1:
        micro = max(largest_fitting(config, planned, budget, "micro_batch_size"), 1)
        config = replace(config, train=replace(config.train, micro_batch_size=micro))
        changes.append(f"train.micro_batch_size={micro} (raise train.grad_accum to keep the batch)")
        if (planned := plan(config, world_size, zero=current)).total_bytes <= budget:
            return advice(planned)
    if (other := first_fitting(config, budget, world_size, skip=current)).fits:
        changes.append(f"deepspeed={other.deepspeed}")
        return advice(other.plan)
    if config.model.quantization in ("none", "int8"):
        variant = replace(config, model=replace(config.model, quantization="nf4"))
        if (nf4 := plan(variant, world_size, zero=current)).total_bytes <= budget:
            changes.append("model.quantization=nf4")
            return advice(nf4)
    for gpus in (count for count in GPU_COUNTS if count > world_size):
        if (more := first_fitting(config, budget, gpus)).fits:
            changes.append(f"{gpus} GPUs with deepspeed={more.deepspeed}")
            return advice(more.plan)
    if length := largest_fitting(config, planned, budget, "max_length"):
        prompt = min(config.data.max_prompt_length, length - 1)
        shorter = replace(config, data=replace(config.data, max_length=length, max_prompt_length=prompt))
        changes.append(f"data.max_length={length} or less")
        return advice(plan(shorter, world_size, zero=current))
    best = first_fitting(config, budget, GPU_COUNTS[-1])
    return (
        f"nothing shipped fits: even {best.gpus} GPUs under {best.deepspeed} need "
        f"{best.plan.total_bytes / 2**30:.2f} GiB per rank; use GPUs with more memory"
    )


def _same(a: ZeroSettings, b: ZeroSettings) -> bool:
    return (a.stage, a.offload_param, a.offload_optimizer) == (b.stage, b.offload_param, b.offload_optimizer)
