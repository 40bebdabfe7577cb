"""How a batch of pairs is laid out for the model, chosen once per run from the model and config."""

from __future__ import annotations

import functools

from dpo_lora.tokenization import VARLEN_KERNELS, collate_pairs


def batch_layout(config, model, pad_token_id: int):
    """(collate function, notices): the prompt shared by chosen and rejected where the model allows
    it, sequences packed without padding where the attention kernel has a varlen path. Each notice
    is one line saying which option is off and why."""
    from dpo_lora.prompt_sharing import unsupported_reason

    notices = []
    share, pack = config.train.share_prompt, config.train.pack_sequences
    if share and (reason := unsupported_reason(model, config.data.max_length)):
        share = False
        notices.append(f"train.share_prompt off: {reason}")
    if pack and (kernel := model.config._attn_implementation) not in VARLEN_KERNELS:
        pack = False
        notices.append(f"train.pack_sequences off: {kernel!r} has no varlen kernel (use flash_attention_2)")
    return functools.partial(collate_pairs, pad_token_id=pad_token_id, share_prompt=share, pack=pack), notices
