"""A job-create request -> the run's config, checked by the same config tree as the CLI.

OpenAI's DPO hyperparameters map onto dpo-lora's knobs; "auto" (or absent) resolves to the
server's base config and is echoed back resolved:
    beta                      -> dpo.beta
    n_epochs                  -> train.epochs
    learning_rate_multiplier  -> train.lr = base lr x multiplier
    batch_size                -> pairs per optimizer step, all ranks: micro_batch_size x grad_accum x ranks
dpo-lora's own knobs come in `extra_body={"dpo_lora": {...}}` (nested or dotted keys), plus the
service's fields `gpus` (devices per job), `zero_stage` (0-3), `offload` (a shipped ZeRO
configuration, picked by name) and `force` (queue it even where its quote does not fit).

A client may set only the keys `client_may_set` allows: a value that can't name a path, a module
or a command (a number, a flag, one of a closed set of choices, or an audited free string). Every
other key is the service's (set per job) or the operator's (their --config). A key added to the
config tree later is therefore refused until it is audited here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dpo_lora.core.config import load_config, split_key
from dpo_lora.core.dsconfig import ZERO_STAGES, read_json, zero_config
from dpo_lora.core.errors import ConfigError, UserError
from dpo_lora.core.schema import Config, kinds, knobs

# Set per job by the service, or only by the operator's --config: paths (the model, the data, the
# run folder, the DeepSpeed JSON, an adapter to start from), code (trust_remote_code), the
# lifecycle (overwrite, resume) and the server's CPUs (tokenizer processes).
SERVICE_KEYS = frozenset(
    {
        "output_dir",
        "overwrite",
        "deepspeed",
        "model.path",
        "data.train",
        "data.eval",
        "train.resume",
        "model.trust_remote_code",
        "lora.init_adapter",
        "data.num_proc",
    }
)
# Strings without a closed set of choices that a client may still give: module-name patterns that
# PEFT matches against the model's layer names, a layer count or its names (all, auto), and W&B's
# names of the run (checked by the config tree; W&B uses none of them in a local path).
FREE_STRINGS = frozenset(
    {"lora.target_modules", "model.checkpoint_layers", "wandb.project", "wandb.entity", "wandb.name", "wandb.tags"}
)
# Knobs of these types are numbers and switches: a client may set them (the config tree checks their ranges).
PLAIN_VALUES = frozenset({bool, int, float, type(None), list[float]})
HYPERPARAMETER_KEYS = {"beta": "dpo.beta", "n_epochs": "train.epochs"}
MAX_INT = 2**53  # JSON's exact integers; larger ones are refused (the store and the trainer need less)


class SpecError(ValueError):
    """A request the config tree refuses; `param` names the request field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class JobSpec:
    config: Config
    deepspeed: dict  # the job's DeepSpeed JSON, to be written at config.deepspeed (the job's folder)
    hyperparameters: dict  # resolved, as echoed back
    devices: int
    force: bool = False  # queue it even where its quote does not fit the server's devices
    parent_adapter: str | None = None  # the fine-tuned model's adapter, copied to config.lora.init_adapter


def client_may_set(key: str) -> bool:
    """Whether a client's request may set this dotted config key."""
    field = knobs().get(key)
    if field is None or key in SERVICE_KEYS:
        return False
    return bool(field.metadata.get("choices")) or key in FREE_STRINGS or set(kinds(key)) <= PLAIN_VALUES


def _flatten(tree: Any, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}, each key checked by the config's parser."""
    if not isinstance(tree, dict):
        raise SpecError("'dpo_lora' must be an object of config keys", "dpo_lora")
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        try:
            parts = split_key(dotted)
        except ConfigError as err:
            raise SpecError(str(err), "dpo_lora") from None
        if isinstance(value, dict):
            if len(parts) > 1:  # only a top-level section holds an object
                raise SpecError(f"dpo_lora.{dotted}: nests deeper than the config tree (section.key)", dotted)
            flat |= _flatten(value, dotted + ".")
        else:
            _check_value(dotted, value)
            flat[dotted] = value
    return flat


def _check_value(key: str, value: Any) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (dict, list)):
            raise SpecError(f"dpo_lora.{key}: a value may be a list of plain values at most", key)
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= MAX_INT:
            raise SpecError(f"dpo_lora.{key}: {item} is out of range", key)
        if isinstance(item, float) and not math.isfinite(item):
            raise SpecError(f"dpo_lora.{key}: must be a finite number, got {item}", key)


def _split_batch(batch_size: int, ranks: int, default_micro: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for `batch_size` pairs per step over `ranks` ranks."""
    if batch_size < ranks or batch_size % ranks:
        raise SpecError(f"batch_size {batch_size} must be a multiple of the job's {ranks} rank(s)", "batch_size")
    per_rank = batch_size // ranks
    micro = max(m for m in range(1, min(default_micro, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def _positive(name: str, value: Any, minimum: float = 0.0, inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise SpecError(f"{name} must be a finite number {bound}, got {value!r}", name)
    return value


def _service_fields(flat: dict, max_devices: int) -> tuple[int, int | None, bool, bool]:
    devices, stage, offload = flat.pop("gpus", 1), flat.pop("zero_stage", None), flat.pop("offload", False)
    force = flat.pop("force", False)
    if not isinstance(force, bool):
        raise SpecError(f"dpo_lora.force must be true or false, got {force!r}", "force")
    if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= max_devices:
        raise SpecError(f"dpo_lora.gpus must be an integer from 1 to {max_devices} (this server's devices)", "gpus")
    if stage is not None and (isinstance(stage, bool) or stage not in ZERO_STAGES):
        raise SpecError(f"dpo_lora.zero_stage must be one of 0, 1, 2, 3, got {stage!r}", "zero_stage")
    if not isinstance(offload, bool):
        raise SpecError(f"dpo_lora.offload must be true or false, got {offload!r}", "offload")
    if offload and stage not in (2, 3):
        raise SpecError("dpo_lora.offload needs dpo_lora.zero_stage 2 or 3", "offload")
    return devices, stage, offload, force


def _load(base_config: str | None, overrides: dict) -> Config:
    try:
        return load_config(base_config, overrides)
    except ConfigError as err:
        raise SpecError(str(err), err.key) from None
    except UserError as err:
        raise SpecError(str(err), None) from None


def build_spec(
    base_config: str | None,
    model_path: str,
    train_file: str,
    eval_file: str | None,
    output_dir: str,
    deepspeed_file: str,
    hyperparameters: dict,
    extra: dict,
    seed: int | None,
    max_devices: int,
    init_adapter: str | None = None,
) -> JobSpec:
    """Resolve and validate; raises SpecError naming the request field or config key. `init_adapter`:
    the adapter of the fine-tuned model the job continues from (also its reference)."""
    flat = _flatten(extra or {})
    devices, stage, offload, force = _service_fields(flat, max_devices)
    for key in flat:
        if key in knobs() and not client_may_set(key):
            raise SpecError(f"config key '{key}' is set by the service or its operator and can't be given", key)
    base = _load(base_config, flat)  # unknown keys and bad values named first

    typed, resolved = dict(flat), {}
    for name, key in HYPERPARAMETER_KEYS.items():
        value = hyperparameters.get(name, "auto")
        if value in (None, "auto"):
            section, field = key.split(".")
            value = getattr(getattr(base, section), field)
        elif key in flat:
            raise SpecError(f"'{name}' and dpo_lora '{key}' both set the same knob; give one", name)
        else:
            typed[key] = _positive(name, value, 1.0 if name == "n_epochs" else 0.0, inclusive=name == "n_epochs")
        resolved[name] = value
    multiplier = hyperparameters.get("learning_rate_multiplier", "auto")
    multiplier = 1.0 if multiplier in (None, "auto") else _positive("learning_rate_multiplier", multiplier)
    typed["train.lr"] = base.train.lr * multiplier
    resolved["learning_rate_multiplier"] = float(multiplier)
    batch_size = hyperparameters.get("batch_size", "auto")
    if batch_size in (None, "auto"):
        batch_size = base.train.micro_batch_size * base.train.grad_accum * devices
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size < MAX_INT:
        raise SpecError("batch_size must be a positive integer", "batch_size")
    else:
        typed["train.micro_batch_size"], typed["train.grad_accum"] = _split_batch(
            batch_size, devices, base.train.micro_batch_size
        )
    resolved["batch_size"] = batch_size
    if seed is not None:
        typed["train.seed"] = seed
    typed |= {
        "model.path": model_path,
        "data.train": train_file,
        "data.eval": eval_file,
        "output_dir": output_dir,
        "deepspeed": deepspeed_file,
    }
    if init_adapter is not None:
        typed["lora.init_adapter"] = init_adapter
    config = _load(base_config, typed)
    try:
        deepspeed = zero_config(stage, offload) if stage is not None else read_json(base.deepspeed)
    except UserError as err:
        raise SpecError(f"the server's DeepSpeed configuration: {err}", None) from None
    return JobSpec(config=config, deepspeed=deepspeed, hyperparameters=resolved, devices=devices, force=force)
