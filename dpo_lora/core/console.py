"""Third-party console output that tells a dpo-lora user nothing they can act on, silenced in one
place for every command. Everything else those libraries say (real warnings, errors) still shows."""

from __future__ import annotations

import logging
import warnings

# Exact starts of messages, by logger. DeepSpeed's note is about its own accelerator detection:
# dpo-lora runs wherever torch runs and names the device it uses itself.
_DROPPED = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),  # optional `kernels` package
}


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_third_party() -> None:
    """Install the filters (idempotent); call before the libraries are first used."""
    from transformers.utils import logging as hf_logging

    for name, starts in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
    hf_logging.disable_progress_bar()  # "Loading weights" bars: dpo-lora shows its own progress
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed's ZeRO collectives (all_gather_into_tensor, reduce_scatter_tensor) call torch names
    # that torch 2.13 renamed to *_single, once per step: nothing a user can act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.\w+` is deprecated\. Please use `torch\.distributed\.\w+_single`",
        category=FutureWarning,
    )
