"""What keeps a run alive or stops it cleanly: scheduler signals and non-finite steps."""

from __future__ import annotations

import math
import os
import signal

import torch

from dpo_lora.core.distributed import any_rank
from dpo_lora.core.errors import UserError

LOSS_SCALE_OVERFLOW = "loss-scale overflow"


class StopRequest:
    """SIGTERM/SIGINT (what a scheduler sends before preemption) asks for a checkpoint at the next
    step boundary; a second signal exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (ranks stop at the same step)."""
        return any_rank(self.requested)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SkippableAdamW(torch.optim.AdamW):
    """ZeRO-0's AdamW. It leaves weights and moments alone while `overflow` is set (DeepSpeed's
    engine reads the same attribute to count the step as skipped and hold the learning-rate
    schedule), and clips with ZeRO-1/2's arithmetic when `max_grad_norm` > 0.

    DeepSpeed clips at ZeRO-0 with another formula (a float32 norm, grad * max/(norm + eps)) than
    at ZeRO-1/2 (a float64 sum of squares, grad * 1/((norm + eps)/max)): they differ in the last
    bit, and a bf16 forward spreads last-bit differences to ~0.01 of loss within a few steps. With
    the engine's clipping off and this one on, ZeRO-0 and ZeRO-2 train the same adapter bit for bit.
    """

    overflow = False
    max_grad_norm = 0.0
    _global_grad_norm = None  # the engine reads it as its global gradient norm

    def step(self, closure=None):
        if self.overflow:
            return None
        if self.max_grad_norm > 0:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            self._global_grad_norm = clip_as_zero_stages(grads, self.max_grad_norm)
        return super().step(closure)


def clip_as_zero_stages(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale `grads` in place to global L2 norm <= max_norm exactly as DeepSpeed's ZeRO-1/2 do for
    one rank's full gradients; returns the norm before clipping (a float32 scalar)."""
    squares = torch.stack([torch.linalg.vector_norm(g.detach().double()) for g in grads]).pow(2)
    # ZeRO-1/2 take one norm per parameter group, then the L2 norm of those (here one group).
    total_norm = torch.linalg.vector_norm(torch.stack([squares.sum().float().pow(0.5)]))
    clip = torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)
    for grad in grads:
        grad.mul_(1.0 / clip)
    return total_norm


class NumericGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite, and aborts after
    `max_bad_steps` in a row.

    A bad loss on any rank poisons this step's gradients with NaN on purpose, so DeepSpeed's own
    overflow check (every ZeRO stage >= 1; at ZeRO-0 a SkippableAdamW) skips the update
    on all ranks alike; the engine's `skipped_steps` confirms it.
    """

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0

    @staticmethod
    def loss_is_bad(loss: torch.Tensor) -> torch.Tensor:
        """A boolean tensor on the loss's device (reading it would wait for the device)."""
        return ~torch.isfinite(loss.detach()).all()

    @staticmethod
    def poison(loss: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """`loss` unchanged (times exactly 1) where the device flag `bad` is false; where it is true,
        a loss whose gradient is NaN for everything it reaches, so the step is rejected as an overflow."""
        return loss * torch.where(bad, math.nan, 1.0)

    @staticmethod
    def flag_overflow_at_zero0(engine, trainable: list[torch.Tensor]) -> None:
        """ZeRO-0 has no overflow check of its own: flag non-finite gradients on the optimizer
        (a SkippableAdamW), which then skips its update while DeepSpeed counts a skipped step."""
        if engine.zero_optimization_stage() == 0 and isinstance(engine.optimizer, SkippableAdamW):
            finite = [torch.isfinite(p.grad).all() for p in trainable if p.grad is not None]
            engine.optimizer.overflow = bool(finite) and not bool(torch.stack(finite).all())

    def record(self, step: int, skip_reason: str | None, rows: list[int]) -> bool:
        """Count a step; True when it was skipped. Raises after `max_bad_steps` skipped in a row.

        fp16's loss-scale overflows are skipped but not counted: the scaler handles them itself
        (an fp16 run starts with a few while it finds its scale).
        """
        if skip_reason is None:
            self.bad_in_row = 0
            return False
        if skip_reason == LOSS_SCALE_OVERFLOW:
            return True
        self.bad_in_row += 1
        if self.bad_in_row >= self.max_bad_steps:
            raise UserError(
                f"aborting at step {step}: {self.bad_in_row} optimizer steps in a row had a non-finite "
                f"{skip_reason} (train.max_bad_steps={self.max_bad_steps}); last bad rows: {rows[:10]}"
            )
        return True
