"""One typed config tree, loaded from YAML with dotted `key=value` overrides.

Every knob has a default and a one-line help string (shown by `dpo-lora config` and listed in the
README). Unknown keys and values of the wrong type are errors naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lora.errors import ConfigError, UserError

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "exo_pair",
    "nca_pair", "sppo_hard", "apo_zero", "apo_down",
)  # fmt: skip
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair")  # the losses dpo.label_smoothing changes


def knob(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values, when they are a closed set)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = knob("models/SmolLM2-135M-Instruct", "base model: a local HF model folder or a hub id")
    quantization: str = knob(
        "nf4", "base weights: 4-bit nf4/fp4 (bitsandbytes), int8, or none", ("nf4", "fp4", "int8", "none")
    )
    dtype: str = knob(
        "bfloat16", "compute dtype of the base and of DeepSpeed mixed precision", ("bfloat16", "float16", "float32")
    )
    float32_residual: bool = knob(
        True,
        "bfloat16 + quantized: keep unquantized weights, the residual stream, the head and LoRA in float32, the base's "
        "matmuls in bf16 under autocast (small LoRA updates survive; off: all bf16)",
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory (non-reentrant)")
    checkpoint_layers: int | str = knob(
        "all",
        "with gradient_checkpointing, how many decoder layers (the first) recompute: all, a number (the rest keep "
        "their activations and skip it; same gradients), or auto (the fewest that fit the GPU, by dpo-lora plan)",
    )
    recompute_attention: bool = knob(
        True,
        "with gradient_checkpointing, rerun the attention kernels in backward too (off: keep their outputs, a few MB "
        "a layer, and skip their second forward; not under ZeRO-3)",
    )
    trust_remote_code: bool = knob(False, "allow model code from the model folder/hub to run (off: safer)")
    attn_implementation: str = knob(
        "auto",
        "attention kernel: auto (sdpa where the model supports it, else eager) or one passed to transformers",
        ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    )


@dataclass
class LoraConfig:
    r: int = knob(16, "LoRA rank")
    alpha: int = knob(32, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = knob(0.05, "dropout on the LoRA input")
    target_modules: Any = knob("all-linear", "module names to adapt: a list, or 'all-linear'")
    init_adapter: str | None = knob(None, "existing PEFT adapter to continue from; it also becomes the reference")


@dataclass
class DataConfig:
    train: str = knob(
        "data/sentiment/train.jsonl", "training pairs: .jsonl/.json/.parquet, a save_to_disk folder, or a hub id"
    )
    eval: str | None = knob(None, "held-out pairs (same formats); if unset, eval_fraction of train is held out")
    eval_fraction: float = knob(0.0, "fraction of train held out for eval when data.eval is unset")
    max_length: int = knob(512, "max tokens of prompt + completion")
    max_prompt_length: int | None = knob(
        None,
        "max prompt tokens; longer prompts keep their leading special tokens and their end; unset: half of max_length",
    )
    group_by_length: bool = knob(False, "fill each global batch with pairs of similar length (less padding)")
    num_proc: int | None = knob(None, "worker processes for tokenization (datasets.map)")
    on_bad_rows: str = knob(
        "error", "bad rows stop the run before training, or are dropped and reported", ("error", "skip")
    )

    def __post_init__(self) -> None:
        if self.max_prompt_length is None:  # only max_length was given (TRL 1.x style)
            self.max_prompt_length = self.max_length // 2


@dataclass
class DpoConfig:
    beta: float = knob(0.1, "strength of the KL penalty toward the reference")
    loss: str = knob("sigmoid", "preference loss", LOSS_TYPES)
    label_smoothing: float = knob(0.0, "assumed label-noise rate (cDPO/robust/exo_pair)")
    reference_free: bool = knob(False, "ignore the reference model (reference log-probs are 0)")
    reference: str = knob(
        "auto",
        "reference log-probs: online (a no-grad forward per step), precompute (once, cached), or auto "
        "(precompute when the run covers at least one epoch)",
        ("auto", "online", "precompute"),
    )  # fmt: skip


@dataclass
class TrainConfig:
    epochs: float = knob(1, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = knob(0, "optimizer steps to run; 0 means derive from epochs")
    micro_batch_size: int = knob(4, "pairs per rank per forward")
    grad_accum: int = knob(1, "micro-batches accumulated per optimizer step")
    lr: float = knob(5e-5, "peak learning rate")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    scheduler: str = knob("cosine", "learning-rate schedule after warmup", ("cosine", "linear", "constant"))
    warmup_ratio: float = knob(0.1, "fraction of steps with linear warmup")
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 disables)")
    collective_timeout_s: int = knob(
        1800,
        "seconds a rank waits in a collective before the job fails naming this key (a hung rank); must exceed "
        "the longest work one rank does while others wait: rank 0 tokenizing uncached data, a checkpoint save",
    )
    seed: int = knob(42, "seed for init, dropout and data order")
    log_every: int = knob(1, "optimizer steps per metrics row")
    eval_every: int = knob(0, "optimizer steps between evals; 0 evaluates only before and after training")
    eval_batch_size: int = knob(8, "pairs per rank per eval forward")
    logps_chunk_size: int = knob(
        1024, "completion tokens per LM-head chunk when scoring (no full logits kept); 0 = plain logits"
    )
    share_prompt: bool = knob(
        True, "run each prompt once for chosen and rejected (exact; off where the attention kernel can't)"
    )
    shared_prompt_attention: str = knob(
        "split",
        "shared-prompt attention on sdpa models: split (two fused causal calls, no mask) or mask (one dense 4D mask)",
        ("split", "mask"),
    )
    pack_sequences: bool = knob(
        False, "padding-free: a micro-batch's sequences in one row (flash_attention_2/3 only; else padded rows)"
    )
    self_check: bool = knob(
        True, "before training, score one micro-batch by the fast paths and the plain path; turn off any that differ"
    )
    cpu_mmap_threshold_mb: int = knob(
        0, "CPU runs: tensors of at least this many MB get their own pages (lower peak RSS, slower steps); 0 = off"
    )
    save_every: int = knob(0, "optimizer steps between checkpoints; 0 saves only at the end")
    keep_checkpoints: int = knob(2, "complete checkpoints kept (older ones are deleted); 0 keeps all")
    resume: str = knob(
        "never",
        "auto: continue from the newest complete checkpoint; force: even if the config changed",
        ("never", "auto", "force"),
    )
    max_bad_steps: int = knob(3, "consecutive non-finite steps (skipped) before the run aborts")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: str = knob(
        "deepspeed_configs/zero2.json", 'DeepSpeed JSON; values set to "auto" are filled from this config'
    )
    output_dir: str = knob("runs/dpo", "where the adapter, metrics and resolved config are written")
    overwrite: bool = knob(False, "allow a new run in an output_dir that already holds one")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to the field's type, or raise a UserError naming `key`."""
    text = str(annotation)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(key, f"config key '{key}' must not be null")
    if text == "int | str":  # a count or a named setting (model.checkpoint_layers)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
    elif text.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif text.startswith("float"):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(key, f"config key '{key}' must be a finite number, got {value!r}")
    elif text.startswith("str"):
        if isinstance(value, str):
            return value
    elif text == "Any":  # lora.target_modules: a string or a list of strings
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
    expected = "all, auto or a count >= 0" if text == "int | str" else text.replace(" | None", " or null")
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
        value = _check_type(key, values[name], f.type)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
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
    if dpo.label_smoothing > 0 and dpo.loss not in SMOOTHED_LOSSES:
        raise _refuse(
            "dpo.label_smoothing",
            f"has no effect on dpo.loss '{dpo.loss}' (only {', '.join(SMOOTHED_LOSSES)} use it); set it to 0",
        )
    if config.lora.r < 1:
        raise _refuse("lora.r", "must be >= 1")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise _refuse("lora.dropout", "must be in [0, 1)")
    layers = config.model.checkpoint_layers
    if layers not in ("all", "auto") and not (isinstance(layers, int) and layers >= 0):
        raise _refuse("model.checkpoint_layers", f"must be all, auto or a count >= 0; got {layers!r}")
    if not 0 <= train.seed < 2**32:
        raise _refuse("train.seed", "must be in [0, 2**32)")
    if not 0 <= train.cpu_mmap_threshold_mb <= 32:
        raise _refuse("train.cpu_mmap_threshold_mb", "must be in [0, 32] (glibc's limit)")


# Keys that may change between a run and its resume: they do not change what is trained.
RESUME_MAY_CHANGE = {
    "output_dir", "overwrite", "data.num_proc", "train.log_every", "train.eval_every", "train.eval_batch_size",
    "train.save_every", "train.keep_checkpoints", "train.resume", "train.max_bad_steps", "train.cpu_mmap_threshold_mb",
    "model.recompute_attention", "model.checkpoint_layers",  # the same gradients, bit for bit (tests/test_checkpointing.py)
    "train.collective_timeout_s",
}  # fmt: skip


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
ADDED_KEYS = {"model.float32_residual": False}


def _as_trained(flat: dict) -> dict:
    """A flat config's values as they act on training: keys older configs lack take the old
    behaviour, and `model.float32_residual` counts only where it applies (a quantized bf16 base)."""
    flat = {**ADDED_KEYS, **flat}
    applies = flat.get("model.dtype") == "bfloat16" and flat.get("model.quantization") != "none"
    flat["model.float32_residual"] = bool(flat["model.float32_residual"]) and applies
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


def knobs(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Dotted key -> its dataclass field (type, default, help, choices), for every knob."""
    found = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= knobs(hints[f.name], prefix + f.name + ".")
        else:
            found[prefix + f.name] = f
    return found


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every knob, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, default, f.metadata["help"]))
    return rows
