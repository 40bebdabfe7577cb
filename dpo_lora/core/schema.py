"""The config tree: every knob as a typed dataclass field with its default and one-line help
(`dpo-lora config --list`, docs/configuration.md), and its closed set of choices where it has one.
Loading, overrides and validation are dpo_lora/core/config.py's."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "bco_pair",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "dpop",
    "discopop",
    "sigmoid_norm",
)  # dpo_lora.train.losses.dpo_loss's, on the policy/reference log-ratios
SORTED_LOSSES = ("aot", "aot_unpaired")  # dpo_lora.train.losses.aot_loss's: log-ratios sorted across the batch
REFERENCE_FREE_LOSSES = ("sft", "simpo", "orpo")  # terms that read the policy alone
UNPAIRED_LOSSES = ("kto",)  # trained on {prompt, completion, label} rows, alone
LOSS_TERMS = LOSS_TYPES + SORTED_LOSSES + REFERENCE_FREE_LOSSES + UNPAIRED_LOSSES  # what dpo.loss may name
# The losses on the chosen-minus-rejected difference, where f-DPO's scores may replace the log-ratios
# (its log Z(x) cancels only there); sft reads no reference and is unchanged.
DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the losses dpo.label_smoothing changes


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
    float32_residual: bool | str = knob(
        "auto",
        "bfloat16 + quantized: keep unquantized weights, the residual stream, the head and LoRA in float32, the base's "
        "matmuls in bf16 under autocast (small LoRA updates survive; false: all bf16, LoRA's weights and optimizer "
        "states still float32); auto: all bf16 where bf16 is native (a GPU, a CPU with AVX512-BF16 or AMX), the float32 "
        "residual where it is emulated (docs/performance.md)",
    )
    gradient_checkpointing: bool = knob(
        False, "recompute activations in backward to save memory (non-reentrant; reentrant under ZeRO-3)"
    )
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
    offload_activations: bool = knob(
        False,
        "with gradient_checkpointing on a GPU: keep each checkpointed layer's input in pinned host memory, copied "
        "out and back without waiting, so one layer's activations bound the length that fits (dpo-lora plan); "
        "no effect on a CPU",
    )
    trust_remote_code: bool = knob(False, "allow model code from the model folder/hub to run (off: safer)")
    attn_implementation: str = knob(
        "auto",
        "attention kernel: auto (sdpa where the model supports it, else eager) or one passed to transformers",
        ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    )
    fused_lora: bool = knob(
        False,
        "run each 4-bit LoRA linear as one autograd function (dequantize, one GEMM, the adapter added by addmm; "
        "backward computes only dX and the adapter's gradients) instead of PEFT's chain of modules; where it does "
        "not apply (int8, unquantized, DoRA) one line says so and PEFT's layers run",
    )
    lora_matmul_dtype: str = knob(
        "float32",
        "with fused_lora in all bf16: the dtype of the adapter's products (bfloat16: A and B rounded to bf16 per "
        "call, no casts of activations, half the saved input; their weights, gradients and AdamW states stay "
        "float32); elsewhere one line says so and float32 runs",
        ("float32", "bfloat16"),
    )
    compile: str = knob(
        "off",
        "layers: compile each decoder layer with torch.compile (fuses the small kernels around the matmuls; "
        "shapes dynamic, the first steps pay the compile; not under ZeRO-3, where one line says so)",
        ("off", "layers"),
    )


@dataclass
class LoraConfig:
    r: int = knob(16, "LoRA rank")
    alpha: int = knob(32, "LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) with lora.rslora)")
    rslora: bool = knob(False, "rank-stabilized LoRA: scale alpha / sqrt(r), which keeps large ranks learning (rsLoRA)")
    dora: bool = knob(
        False,
        "DoRA: a trained magnitude per output row times the direction W + scale * B @ A, normalised per row "
        "(PEFT's use_dora; slower steps, a dense weight norm per layer)",
    )
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
    beta: float = knob(
        0.1, "strength of the KL penalty toward the reference (simpo: the reward scale; its paper uses 2-10)"
    )
    loss: str | list[str] = knob(
        "sigmoid",
        "preference loss, or a list of terms summed with dpo.loss_weights: [sigmoid, sft] is RPO; sft (the chosen "
        "completion's per-token NLL), simpo and orpo need no reference model; aot and aot_unpaired compare "
        "log-ratios sorted across each micro-batch; kto trains on unpaired "
        "{prompt, completion, label} rows",
        LOSS_TERMS,
    )
    loss_weights: list[float] | None = knob(None, "weight of each dpo.loss term, in order; unset: 1.0 each")
    label_smoothing: float = knob(0.0, "assumed label-noise rate (cDPO/robust/exo_pair)")
    simpo_gamma: float = knob(0.5, "simpo: target reward margin gamma (its paper: gamma / beta about 0.5)")
    orpo_lambda: float = knob(0.1, "orpo: weight of the odds-ratio term beside the chosen NLL")
    dpop_lambda: float = knob(50.0, "dpop: weight of the penalty on chosen log-probs falling below the reference's")
    discopop_tau: float = knob(0.05, "discopop: temperature of the log-ratio modulation (its paper: 0.05)")
    ld_alpha: float = knob(
        1.0,
        "LD-DPO: weight of each pair's tokens past its shorter completion's length, in policy and reference "
        "log-probs alike (less pull toward length); 1: plain sums",
    )
    f_divergence: str = knob(
        "reverse_kl",
        "f-DPO: the divergence from the reference that the loss constrains; each log-ratio becomes f'(u) - f'(1), "
        "u = pi / ref (reverse_kl: DPO); only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (+ sft)",
        DIVERGENCES,
    )
    f_alpha: float = knob(
        0.5, "alpha_divergence: f'(u) = (u^(alpha-1) - 1) / (alpha-1), TRL's f_alpha_divergence_coef (1 - the paper's)"
    )
    wpo: bool = knob(
        False,
        "WPO: weigh each pair's loss by the policy's probability of sampling its completions, "
        "exp(mean_t log p(y_t) - log sum_v p(v)^2) for chosen times rejected, no gradient (TRL's use_weighting)",
    )
    kto_desirable_weight: float = knob(1.0, "kto: weight of the desirable (label true) rows' loss")
    kto_undesirable_weight: float = knob(
        1.0,
        "kto: weight of the undesirable rows' loss (its paper: keep w_D x desirable / (w_U x undesirable) in [1, 4/3])",
    )
    reference_free: bool = knob(False, "ignore the reference model (reference log-probs are 0)")
    reference: str = knob(
        "auto",
        "reference log-probs: online (a no-grad forward per step), precompute (once, cached), or auto "
        "(precompute when the run covers at least one epoch; online when the reference moves)",
        ("auto", "online", "precompute"),
    )
    sync_reference_every: int = knob(
        0,
        "TR-DPO's hard update: every N optimizer steps the reference becomes the policy (the adapter copied into "
        "a frozen reference adapter; held-out rewards stay measured against the first reference); 0: fixed",
    )

    @property
    def names(self) -> list[str]:
        """The names of dpo.loss's terms, in order."""
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @property
    def terms(self) -> list[tuple[str, float]]:
        """(loss name, weight) for each term of dpo.loss, in order."""
        return list(zip(self.names, self.loss_weights or [1.0] * len(self.names), strict=True))

    @property
    def uses_reference(self) -> bool:
        """Whether any term reads the reference model's log-probs."""
        return not self.reference_free and any(name not in REFERENCE_FREE_LOSSES for name, _ in self.terms)


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
        "shared-prompt attention on sdpa models: split (two fused causal calls, no mask), flex (one FlexAttention "
        "call with a block mask; CUDA only, elsewhere one line says so and split runs) or mask (one dense 4D mask)",
        ("split", "flex", "mask"),
    )
    pack_sequences: bool = knob(
        False, "padding-free: a micro-batch's sequences in one row (flash_attention_2/3 only; else padded rows)"
    )
    pad_to_multiple_of: int = knob(
        0,
        "pad each micro-batch's rows to a multiple of this many tokens: fewer distinct shapes (compiled layers, "
        "CUDA graphs) and tensor-core-friendly widths, at the cost the log's padding_fraction shows; 0 = to the "
        "longest row; packed rows are not padded",
    )
    self_check: bool = knob(
        True, "before training, score one micro-batch by the fast paths and the plain path; turn off any that differ"
    )
    cpu_mmap_threshold_mb: int = knob(
        0, "CPU runs: tensors of at least this many MB get their own pages (lower peak RSS, slower steps); 0 = off"
    )
    save_every: int = knob(0, "optimizer steps between checkpoints; 0 saves only at the end")
    best_metric: str = knob(
        "auto",
        "held-out metric that picks the best checkpoint (saved at every eval that improves it, never pruned; "
        "`export RUN --checkpoint best`): auto is reward accuracy, ties broken by margin; none turns it off",
        ("auto", "eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "none"),
    )
    early_stopping_patience: int = knob(
        0, "stop after this many evals without a better train.best_metric (0: never stop early)"
    )
    keep_checkpoints: int = knob(2, "complete checkpoints kept (older ones are deleted); 0 keeps all")
    resume: str = knob(
        "never",
        "auto: continue from the newest complete checkpoint; force: even if the config changed",
        ("never", "auto", "force"),
    )
    max_bad_steps: int = knob(3, "consecutive non-finite steps (skipped) before the run aborts")


@dataclass
class MonitorConfig:
    """What dpo_lora.train.monitors watches for; each warning is a `health` row and a console line."""

    enabled: bool = knob(True, "watch the run's DPO health and warn (the run goes on either way)")
    window_pairs: int = knob(
        64, "training pairs (the newest logged rows that hold them) that saturation and length exploitation average"
    )
    displacement_nats_per_token: float = knob(
        0.01,
        "likelihood displacement: warn when the chosen completions' log-probs fall this far below the reference's "
        "(per token) while the margin grows",
    )
    kl_nats_per_token: float = knob(
        0.02, "KL growth: warn when the mean chosen log-ratio to the reference exceeds this (either sign, per token)"
    )
    saturation_accuracy: float = knob(
        0.98, "saturation: train reward accuracy at or above this over the window while held-out accuracy stalls"
    )
    saturation_evals: int = knob(2, "saturation: evals without a better held-out reward accuracy")
    length_correlation: float = knob(
        0.5, "length exploitation: warn when margin and chosen-minus-rejected length correlate above this"
    )
    grad_norm_spike: float = knob(
        10.0, "warn when a window's gradient norm exceeds this multiple of the median of earlier windows"
    )


@dataclass
class WandbConfig:
    """Weights & Biases: the run's metrics rows (those TensorBoard gets) and its resolved config."""

    project: str | None = knob(
        None, "W&B project to log the run to; unset: no W&B (needs `pip install wandb`, and a key: WANDB_API_KEY)"
    )
    entity: str | None = knob(None, "W&B team or user that owns the project (unset: the key's default)")
    name: str | None = knob(None, "the W&B run's display name (unset: the output folder's name)")
    tags: list[str] = knob([], "W&B tags of the run")
    mode: str = knob(
        "auto",
        "online streams to W&B; offline writes under OUTPUT_DIR/wandb, for `wandb sync` later; auto: WANDB_MODE, "
        "else online",
        ("auto", "online", "offline"),
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: str = knob(
        "deepspeed_configs/zero2.json", 'DeepSpeed JSON; values set to "auto" are filled from this config'
    )
    output_dir: str = knob("runs/dpo", "where the adapter, metrics and resolved config are written")
    overwrite: bool = knob(False, "allow a new run in an output_dir that already holds one")


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, dataclass field, resolved type) for every knob, in declaration order."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += _leaves(hints[f.name], prefix + f.name + ".")
        else:
            found.append((prefix + f.name, f, hints[f.name]))
    return found


def knobs() -> dict[str, dataclasses.Field]:
    """Dotted key -> its dataclass field (type, default, help, choices), for every knob."""
    return {key: f for key, f, _ in _leaves()}


def kinds(key: str) -> tuple:
    """The types a knob's value may have (the members of its union): (float,), (str, list[str])."""
    hint = {dotted: hint for dotted, _, hint in _leaves()}[key]
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every knob, in declaration order."""
    rows = []
    for key, f, _ in _leaves():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, default, f.metadata["help"]))
    return rows
