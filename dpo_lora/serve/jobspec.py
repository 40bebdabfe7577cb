"""A job-create request -> the run's config, checked by the same config tree as the CLI.

OpenAI's DPO hyperparameters map onto dpo-lora's knobs; "auto" (or absent) resolves to the
server's base config and is echoed back resolved:
    beta                      -> dpo.beta
    n_epochs                  -> train.epochs
    learning_rate_multiplier  -> train.lr = base lr x multiplier
    batch_size                -> pairs per optimizer step, all ranks: micro_batch_size x grad_accum x ranks
dpo-lora's own knobs come in `extra_body={"dpo_lora": {...}}` (nested or dotted keys), plus `gpus`
(devices per job). Keys the service sets itself can't be given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpo_lora.config import Config, flat_items, load_config
from dpo_lora.errors import UserError

# Set per job by the service, or (trust_remote_code) only by the operator's --config.
SERVICE_KEYS = (
    "output_dir",
    "overwrite",
    "model.path",
    "data.train",
    "data.eval",
    "train.resume",
    "model.trust_remote_code",
)
HYPERPARAMETER_KEYS = {"beta": "dpo.beta", "n_epochs": "train.epochs"}


class SpecError(ValueError):
    """A request the config tree refuses; `param` names the request field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class JobSpec:
    config: Config
    hyperparameters: dict  # resolved, as echoed back
    devices: int


def _flatten_extra(extra: dict) -> dict:
    if not isinstance(extra, dict):
        raise SpecError("'dpo_lora' must be an object of config keys", "dpo_lora")
    return flat_items({key: value for key, value in extra.items()})


def _split_batch(batch_size: int, ranks: int, default_micro: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for `batch_size` pairs per step over `ranks` ranks."""
    if batch_size < ranks or batch_size % ranks:
        raise SpecError(f"batch_size {batch_size} must be a multiple of the job's {ranks} rank(s)", "batch_size")
    per_rank = batch_size // ranks
    micro = max(m for m in range(1, min(default_micro, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def build_spec(
    base_config: str | None,
    model_path: str,
    train_file: str,
    eval_file: str | None,
    output_dir: str,
    hyperparameters: dict,
    extra: dict,
    seed: int | None,
    max_devices: int,
) -> JobSpec:
    """Resolve and validate; raises SpecError naming the request field or config key."""
    flat = _flatten_extra(extra or {})
    devices = flat.pop("gpus", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= max_devices:
        raise SpecError(f"dpo_lora.gpus must be an integer from 1 to {max_devices} (this server's devices)", "gpus")
    for key in flat:
        if key in SERVICE_KEYS:
            raise SpecError(f"config key '{key}' is set by the service and can't be given", key)
    overrides = [f"{key}={json.dumps(value)}" for key, value in flat.items()]
    try:
        base = load_config(base_config, overrides)
    except UserError as err:
        raise SpecError(str(err), _named_key(str(err))) from None

    resolved, more = {}, []
    for name, key in HYPERPARAMETER_KEYS.items():
        value = hyperparameters.get(name, "auto")
        section, field = key.split(".")
        if value in (None, "auto"):
            value = getattr(getattr(base, section), field)
        elif key in flat:
            raise SpecError(f"'{name}' and dpo_lora '{key}' both set the same knob; give one", name)
        else:
            more.append(f"{key}={json.dumps(value)}")
        resolved[name] = value
    multiplier = hyperparameters.get("learning_rate_multiplier", "auto")
    multiplier = 1.0 if multiplier in (None, "auto") else multiplier
    if not isinstance(multiplier, (int, float)) or multiplier <= 0:
        raise SpecError("learning_rate_multiplier must be a positive number", "learning_rate_multiplier")
    more.append(f"train.lr={base.train.lr * multiplier!r}")
    resolved["learning_rate_multiplier"] = float(multiplier)
    batch_size = hyperparameters.get("batch_size", "auto")
    if batch_size in (None, "auto"):
        batch_size = base.train.micro_batch_size * base.train.grad_accum * devices
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SpecError("batch_size must be a positive integer", "batch_size")
    else:
        micro, accum = _split_batch(batch_size, devices, base.train.micro_batch_size)
        more += [f"train.micro_batch_size={micro}", f"train.grad_accum={accum}"]
    resolved["batch_size"] = batch_size
    if seed is not None:
        more.append(f"train.seed={int(seed)}")
    service = [f"model.path={json.dumps(model_path)}", f"data.train={json.dumps(train_file)}",
               f"data.eval={json.dumps(eval_file)}", f"output_dir={json.dumps(output_dir)}"]  # fmt: skip
    try:
        config = load_config(base_config, overrides + more + service)
    except UserError as err:
        raise SpecError(str(err), _named_key(str(err))) from None
    if Path(config.deepspeed).is_file():  # the run starts in its own folder
        config.deepspeed = str(Path(config.deepspeed).resolve())
    return JobSpec(config=config, hyperparameters=resolved, devices=devices)


def _named_key(message: str) -> str | None:
    """The dotted key a config error names ("config key 'train.lr' must ..." -> "train.lr")."""
    for marker in ("config key '", "unknown config key '"):
        if marker in message:
            return message.split(marker, 1)[1].split("'", 1)[0]
    return None
