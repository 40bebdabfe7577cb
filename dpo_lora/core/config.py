"""Loading the config tree (dpo_lora/core/schema.py) from YAML and overrides, and checking it.

Overrides are typed values by dotted key (the service), or `key=value` strings (the command line);
one parser reads every key (`split_key`). Unknown keys, values of the wrong type and values out of
range are ConfigErrors naming the dotted key. Also: what a resume may change, and the YAML dump.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dpo_lora.core.errors import ConfigError, UserError
from dpo_lora.core.schema import DIVERGENCE_LOSSES, SMOOTHED_LOSSES, Config, MonitorConfig

_NOT = object()  # a value that is not of a type


def _as(value: Any, kind: Any) -> Any:
    """`value` as `kind` (one member of a field's type), or _NOT."""
    if kind is bool:
        return value if isinstance(value, bool) else _NOT
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _NOT
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NOT
    if kind is str:
        return value if isinstance(value, str) else _NOT
    if typing.get_origin(kind) is list:  # list[str], list[float]: every item as the item type
        items = [_as(item, typing.get_args(kind)[0]) for item in value] if isinstance(value, list) else [_NOT]
        return items if items and _NOT not in items else _NOT
    if kind is Any:  # lora.target_modules: a string or a list of strings
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        return value if ok else _NOT
    return _NOT


# YAML 1.1 reads these words, unquoted, as booleans: `compile: off` arrives as False.
YAML_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _unbooled(value: Any, hint: Any, choices: tuple | None) -> Any:
    """A boolean given to a field that takes no booleans, as the one word among its choices that
    YAML read as that boolean (`model.compile=off` -> "off"); any other value as it is."""
    if not isinstance(value, bool) or not choices or bool in typing.get_args(hint) or hint is bool:
        return value
    words = [word for word in YAML_BOOL_WORDS[value] if word in choices]
    return words[0] if len(words) == 1 else value


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` coerced to the field's type `hint` (a type, or a union of them), or a ConfigError
    naming `key`."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        raise ConfigError(key, f"config key '{key}' must not be null")
    for kind in kinds:
        coerced = _as(value, kind)
        if coerced is not _NOT:
            if isinstance(coerced, float) and not math.isfinite(coerced):
                raise ConfigError(key, f"config key '{key}' must be a finite number, got {value!r}")
            return coerced
    names = ["null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in kinds]
    expected = "all, auto or a count >= 0" if set(kinds) == {int, str} else " or ".join(names)
    raise ConfigError(key, f"config key '{key}' must be {expected}, got {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        key = prefix.rstrip(".") or None
        raise ConfigError(key, f"config key '{key or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            raise ConfigError(f"{prefix}{name}", f"unknown config key '{prefix}{name}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], values[name], key + ".")
            continue
        if values[name] == [] and f.default_factory is not dataclasses.MISSING and f.default_factory() == []:
            kwargs[name] = []  # a list knob that is empty by default (wandb.tags) may be given empty
            continue
        choices = f.metadata.get("choices")
        value = _check_type(key, _unbooled(values[name], hints[name], choices), hints[name])
        if choices and any(item not in choices for item in (value if isinstance(value, list) else [value])):
            raise ConfigError(key, f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


KEY_PART = re.compile(r"[a-z_][a-z0-9_]*")


def split_key(dotted: str) -> tuple[str, ...]:
    """A dotted key's names, or a ConfigError: the one parser of keys, for the CLI and the service
    alike, so no spelling (a space, a second `=`, an empty part) names a key another check missed."""
    parts = tuple(dotted.split(".")) if isinstance(dotted, str) else ()
    if not parts or not all(KEY_PART.fullmatch(part) for part in parts):
        raise ConfigError(None, f"config key {dotted!r} is not a dotted name like train.lr")
    return parts


def parse_override(text: str) -> tuple[str, Any]:
    """A command-line `dotted.key=value` -> (key, value), the value read as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like dotted.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(dotted.strip(), f"override '{text}': not a YAML value: {str(err).splitlines()[0]}") from None
    return dotted.strip(), value


def set_key(tree: dict, dotted: str, value: Any) -> None:
    """Set one dotted key in a nested dict, with the key checked by `split_key`."""
    *sections, leaf = split_key(dotted)
    node = tree
    for depth, part in enumerate(sections):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(sections[: depth + 1])
            raise ConfigError(section, f"override '{dotted}': '{section}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Load a YAML file (or only defaults when `path` is None), apply overrides, validate.

    `overrides` are typed values by dotted key, or command-line `dotted.key=value` strings."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for dotted, value in items:
        set_key(tree, dotted, value)
    config = _build(Config, tree, "")
    validate(config)
    return config


def _refuse(key: str, rule: str) -> ConfigError:
    return ConfigError(key, f"config key '{key}' {rule}")


def validate(config: Config) -> None:
    """Cross-field and range checks that a per-key type check cannot express."""
    data, train, dpo = config.data, config.train, config.dpo
    if data.max_prompt_length >= data.max_length:
        raise _refuse("data.max_prompt_length", "must be smaller than 'data.max_length'")
    if data.max_prompt_length < 1:
        raise _refuse("data.max_prompt_length", "must be >= 1")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise _refuse("data.eval_fraction", "must be in [0, 1)")
    for key in (
        "micro_batch_size",
        "grad_accum",
        "log_every",
        "eval_batch_size",
        "max_bad_steps",
        "collective_timeout_s",
    ):
        if getattr(train, key) < 1:
            raise _refuse(f"train.{key}", "must be >= 1")
    if train.max_steps <= 0 and train.epochs <= 0:
        raise _refuse("train.epochs", "must be > 0 when 'train.max_steps' is 0")
    if train.lr <= 0:
        raise _refuse("train.lr", "must be > 0")
    if not 0.0 <= train.warmup_ratio <= 1.0:
        raise _refuse("train.warmup_ratio", "must be in [0, 1]")
    for key in ("weight_decay", "max_grad_norm"):
        if getattr(train, key) < 0:
            raise _refuse(f"train.{key}", "must be >= 0")
    if dpo.beta <= 0:
        raise _refuse("dpo.beta", "must be > 0")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        raise _refuse("dpo.label_smoothing", "must be in [0, 0.5)")
    names = dpo.names
    if len(set(names)) < len(names):
        raise _refuse("dpo.loss", f"names a term twice: {names}")
    if "bco_pair" in names[1:]:  # its reward baseline follows the run's rewards: the first term's
        raise _refuse("dpo.loss", "must list bco_pair first (its reward baseline follows the first term)")
    if dpo.loss_weights is not None and len(dpo.loss_weights) != len(names):
        raise _refuse("dpo.loss_weights", f"has {len(dpo.loss_weights)} weight(s) for {len(names)} dpo.loss term(s)")
    if dpo.loss_weights is not None and (min(dpo.loss_weights) < 0 or max(dpo.loss_weights) == 0):
        raise _refuse("dpo.loss_weights", "must be >= 0, and not all 0")
    if dpo.label_smoothing > 0 and not set(names) & set(SMOOTHED_LOSSES):
        raise _refuse(
            "dpo.label_smoothing",
            f"has no effect on dpo.loss '{dpo.loss}' (only {', '.join(SMOOTHED_LOSSES)} use it); set it to 0",
        )
    if "kto" in names and len(names) > 1:
        raise _refuse("dpo.loss", "kto trains on unpaired rows and can't be mixed with other terms")
    for key in ("simpo_gamma", "orpo_lambda", "dpop_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(dpo, key) < 0:
            raise _refuse(f"dpo.{key}", "must be >= 0")
    if not 0.0 <= dpo.ld_alpha <= 1.0:
        raise _refuse("dpo.ld_alpha", "must be in [0, 1]")
    if dpo.ld_alpha != 1.0 and "kto" in names:
        raise _refuse("dpo.ld_alpha", "weighs a pair's longer completion; kto's rows are not pairs")
    if dpo.f_divergence != "reverse_kl" and not set(names) <= set(DIVERGENCE_LOSSES):
        others = ", ".join(name for name in names if name not in DIVERGENCE_LOSSES)
        raise _refuse("dpo.f_divergence", f"only changes losses on the chosen-minus-rejected difference, not {others}")
    if dpo.f_divergence == "alpha_divergence" and not 0.0 < dpo.f_alpha < 1.0:
        raise _refuse("dpo.f_alpha", "must be in (0, 1)")
    if dpo.wpo and set(names) & {"kto", "aot", "aot_unpaired"}:
        reason = "kto's rows are not pairs" if "kto" in names else "aot's losses belong to sorted quantiles, not pairs"
        raise _refuse("dpo.wpo", f"weighs each pair's loss; {reason}")
    if dpo.discopop_tau <= 0:
        raise _refuse("dpo.discopop_tau", "must be > 0")
    if dpo.sync_reference_every < 0:
        raise _refuse("dpo.sync_reference_every", "must be >= 0")
    if dpo.sync_reference_every and not dpo.uses_reference:
        raise _refuse("dpo.sync_reference_every", f"dpo.loss {dpo.loss} reads no reference to sync")
    if dpo.sync_reference_every and dpo.reference == "precompute":
        raise _refuse("dpo.sync_reference_every", "a reference that moves can't be precomputed: dpo.reference online")
    if config.lora.r < 1:
        raise _refuse("lora.r", "must be >= 1")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise _refuse("lora.dropout", "must be in [0, 1)")
    if config.model.float32_residual not in (True, False, "auto"):
        raise _refuse("model.float32_residual", f"must be true, false or auto; got {config.model.float32_residual!r}")
    if config.model.lora_matmul_dtype == "bfloat16" and not config.model.fused_lora:
        raise _refuse("model.lora_matmul_dtype", "bfloat16 runs in the fused layers: set model.fused_lora: true")
    layers = config.model.checkpoint_layers
    if layers not in ("all", "auto") and not (isinstance(layers, int) and layers >= 0):
        raise _refuse("model.checkpoint_layers", f"must be all, auto or a count >= 0; got {layers!r}")
    if config.model.offload_activations and not config.model.gradient_checkpointing:
        raise _refuse("model.offload_activations", "offloads the checkpointed layers' inputs: set model.gradient_checkpointing: true")  # fmt: skip
    if config.model.offload_activations and layers not in ("all", "auto"):
        raise _refuse("model.offload_activations", "keeps every layer's input on the host: set model.checkpoint_layers: all")  # fmt: skip
    if train.early_stopping_patience < 0:
        raise _refuse("train.early_stopping_patience", "must be >= 0")
    if train.early_stopping_patience and (train.best_metric == "none" or not train.eval_every):
        raise _refuse(
            "train.early_stopping_patience", "needs train.eval_every > 0 and a train.best_metric other than none"
        )
    if not 0 <= train.seed < 2**32:
        raise _refuse("train.seed", "must be in [0, 2**32)")
    if train.pad_to_multiple_of < 0:
        raise _refuse("train.pad_to_multiple_of", "must be >= 0")
    if not 0 <= train.cpu_mmap_threshold_mb <= 32:
        raise _refuse("train.cpu_mmap_threshold_mb", "must be in [0, 32] (glibc's limit)")
    _validate_monitor(config.monitor)
    _validate_wandb(config.wandb)


def _validate_monitor(monitor) -> None:
    for key in ("window_pairs", "saturation_evals"):
        if getattr(monitor, key) < 1:
            raise _refuse(f"monitor.{key}", "must be >= 1")
    for key in ("displacement_nats_per_token", "kl_nats_per_token", "grad_norm_spike"):
        if getattr(monitor, key) <= 0:
            raise _refuse(f"monitor.{key}", "must be > 0")
    if not 0 < monitor.saturation_accuracy <= 1:
        raise _refuse("monitor.saturation_accuracy", "must be in (0, 1]")
    if not 0 < monitor.length_correlation < 1:
        raise _refuse("monitor.length_correlation", "must be in (0, 1)")


W_AND_B_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what W&B allows in project and entity names


def _validate_wandb(wandb) -> None:
    for key in ("project", "entity"):
        value = getattr(wandb, key)
        if value is not None and not W_AND_B_NAME.fullmatch(value):
            raise _refuse(f"wandb.{key}", "must be 1-128 letters, digits, '.', '_' or '-'")
    if wandb.name is not None and not 0 < len(wandb.name) <= 128:
        raise _refuse("wandb.name", "must be 1-128 characters")
    if any(not 0 < len(tag) <= 64 for tag in wandb.tags):
        raise _refuse("wandb.tags", "each tag must be 1-64 characters")


MONITOR_KEYS = tuple(f.name for f in dataclasses.fields(MonitorConfig))

# Keys that may change between a run and its resume: they do not change what is trained.
RESUME_MAY_CHANGE = {
    "output_dir",
    "overwrite",
    "data.num_proc",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.save_every",
    "train.keep_checkpoints",
    "train.best_metric",
    "train.early_stopping_patience",
    "train.resume",
    "train.max_bad_steps",
    "train.cpu_mmap_threshold_mb",
    "train.pad_to_multiple_of",  # padding is masked out: the same log-probs (tests/data/test_layout.py)
    "model.recompute_attention",
    "model.offload_activations",  # the same gradients (tests/model/test_offload.py)
    "model.checkpoint_layers",  # the same gradients, bit for bit (tests/model/test_grad_checkpointing.py)
    "train.collective_timeout_s",
    *(f"monitor.{name}" for name in MONITOR_KEYS),  # warnings only
    *(f"wandb.{name}" for name in ("project", "entity", "name", "tags", "mode")),  # where metrics also go
}


def flat_items(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_items(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# Keys added after runs were saved, with the value that trains as those versions did.
ADDED_KEYS = {
    "model.float32_residual": False,
    "lora.rslora": False,
    "lora.dora": False,
    "model.fused_lora": False,
    "model.lora_matmul_dtype": "float32",
    "model.compile": "off",
    "train.pad_to_multiple_of": 0,
    "dpo.loss_weights": None,
    "dpo.simpo_gamma": 0.5,
    "dpo.orpo_lambda": 0.1,
    "dpo.dpop_lambda": 50.0,
    "dpo.kto_desirable_weight": 1.0,
    "dpo.kto_undesirable_weight": 1.0,
}


def _as_trained(flat: dict) -> dict:
    """A flat config's values as they act on training: keys older configs lack take the old
    behaviour, and `model.float32_residual` counts only where it applies (a quantized bf16 base)."""
    flat = {**ADDED_KEYS, **flat}
    applies = flat.get("model.dtype") == "bfloat16" and flat.get("model.quantization") != "none"
    chosen = flat["model.float32_residual"]  # "auto" until a run resolves it for its device
    flat["model.float32_residual"] = (chosen if chosen == "auto" else bool(chosen)) and applies
    return flat


def resume_differences(saved: dict, current: Config) -> list[str]:
    """The keys whose change would make a resumed run differ from the uninterrupted one."""
    old, new = _as_trained(flat_items(saved)), _as_trained(flat_items(to_dict(current)))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key)
    ]


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
