"""TR-DPO's moving reference (`dpo.sync_reference_every`, Gorbatovski et al., 2024, hard updates).

The reference is a second, frozen adapter named `reference` (what `load.reference_mode` runs in
place of the disabled adapter) that becomes a copy of the policy adapter every N optimizer steps.
One copy of the base still serves policy and reference; the reference costs one adapter's
parameters. TRL refuses TR-DPO with PEFT; here a LoRA reference is exact, because copying the
factors copies the update B @ A. Under ZeRO-3 both adapters are partitioned alike, so each rank
copies its own partition: no gather. A continued adapter (`lora.init_adapter`) already has its
frozen copy as the reference; that copy then moves.
"""

from __future__ import annotations

import torch

from dpo_lora.model.load import POLICY_ADAPTER, REFERENCE_ADAPTER, lora_in_float32
from dpo_lora.model.zero3_loading import peft_gathers


def add_reference_copy(model) -> None:
    """Give `model` (a PeftModel, before DeepSpeed wraps it) a frozen reference adapter equal to
    its policy adapter, where it has none."""
    if REFERENCE_ADAPTER not in model.peft_config:
        with peft_gathers(model):  # DoRA's first magnitudes read each base weight
            model.add_adapter(REFERENCE_ADAPTER, model.peft_config[POLICY_ADAPTER])
        model.set_adapter(POLICY_ADAPTER)  # the policy trains, the reference is frozen
        for policy, reference in _pairs(model).values():
            reference.data = reference.data.to(policy.dtype)  # the policy's float32, as trained
        lora_in_float32(model)
    sync_reference(model)


@torch.no_grad()
def sync_reference(model) -> None:
    """The reference becomes the policy: every policy adapter tensor copied into the reference's."""
    for policy, reference in _pairs(model).values():
        _local(reference).copy_(_local(policy))


def reference_state(model) -> dict[str, torch.Tensor]:
    """This rank's reference adapter (its ZeRO-3 partition, or the whole), for a checkpoint."""
    return {name: _local(reference).detach().clone() for name, (_, reference) in _pairs(model).items()}


@torch.no_grad()
def load_reference_state(model, state: dict[str, torch.Tensor]) -> None:
    pairs = _pairs(model)
    if sorted(state) != sorted(pairs):
        raise ValueError(f"the checkpoint's reference adapter has {len(state)} tensors, this model's {len(pairs)}")
    for name, (_, reference) in pairs.items():
        _local(reference).copy_(state[name])


def _pairs(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Policy parameter name -> (policy parameter, the reference's parameter of the same place)."""
    params = dict(model.named_parameters())
    policy, reference = f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}."
    return {name: (p, params[name.replace(policy, reference)]) for name, p in params.items() if policy in name}


def _local(param: torch.nn.Parameter) -> torch.Tensor:
    """The values this rank holds: ZeRO-3's partition, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data
