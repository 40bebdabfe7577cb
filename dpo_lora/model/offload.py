"""Activation offloading (`model.offload_activations`): what the policy's forward saves for its backward
goes to pinned host memory as it is saved, and comes back when the backward reads it.

With gradient checkpointing, which it requires, a forward saves each checkpointed layer's input:
[rows, tokens, hidden] a layer, the activation that grows with depth and length alike. Offloaded, the
device holds one layer's input (back for its recompute) and that layer's recompute, so the longest
sequence that fits is bounded by one layer instead of by all of them (`dpo-lora plan` puts the inputs in
its host column). Unsloth's offloaded gradient checkpointing and TRL's `activation_offloading` do this.

torch's checkpoint saves each checkpointed layer's input with save_for_backward before it installs its own
saved-tensor hooks (`_CheckpointFrame.save_inputs`), so these hooks, around the whole forward, see it; what
the layer saves inside goes to checkpoint's hooks and is recomputed. Under selective checkpointing
(`model.recompute_attention: false`) the kept attention outputs stay on the device, in checkpoint's cache.

The copies are queued on the compute stream, non-blocking: the copy out runs after the kernel that wrote
the tensor, and the caching allocator hands the device block only to work queued after it; the copy back
is queued before the backward kernels that read it. The host never reads the pinned copies, so nothing
waits for them. Parameters (and views of them) stay, and so do tensors under `min_bytes` (a copy costs
more than they save). On a CPU there is no other memory to move to, and the hooks leave every tensor
where it is (tests patch `HOST` and `MIN_BYTES` to send the tiny model's tensors through the same copies).
"""

from __future__ import annotations

import functools

import torch

MIN_BYTES = 1 << 20  # a saved tensor smaller than this stays where it is
HOST = "cpu"  # the device type offloaded tensors go to (tests count the CPU as an accelerator, MIN_BYTES 0)


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Within the block, saved tensors of at least `min_bytes` on an accelerator go to pinned host memory
    (`moves(tensor)` decides; `offloaded_bytes` counts what went)."""

    def __init__(self, min_bytes: int | None = None):
        self.offloaded_bytes = 0
        min_bytes = MIN_BYTES if min_bytes is None else min_bytes

        def pack(tensor: torch.Tensor):
            if not moves(tensor, min_bytes):
                return tensor
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
            host.copy_(tensor, non_blocking=True)
            self.offloaded_bytes += tensor.numel() * tensor.element_size()
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def moves(tensor: torch.Tensor, min_bytes: int) -> bool:
    """Whether a saved tensor goes to the host: an activation (not a parameter or a view of one), dense,
    on an accelerator, of at least `min_bytes`."""
    base = tensor._base if tensor._base is not None else tensor
    return (
        tensor.device.type != HOST
        and tensor.layout == torch.strided
        and not isinstance(base, torch.nn.Parameter)
        and tensor.numel() * tensor.element_size() >= min_bytes
    )


def install(model, min_bytes: int | None = None) -> None:
    """Offload what every forward of `model` (the base transformers model) saves while gradients are on:
    the policy's forward; the reference's runs without gradients and saves nothing."""
    forward = model.forward

    @functools.wraps(forward)
    def offloading_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        hooks = OffloadSaved(min_bytes)
        with hooks:
            output = forward(*args, **kwargs)
        model.dpo_lora_offloaded_bytes = hooks.offloaded_bytes
        return output

    model.forward = offloading_forward
    model.dpo_lora_offloaded_bytes = 0
