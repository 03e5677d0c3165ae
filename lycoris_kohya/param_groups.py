"""The optimizer's parameter groups as sd-scripts asks for them: one per text encoder and one for the
U-Net/DiT (or one per block with block-wise lr weights), each split in two when a LoRA+ ratio is set
(the algorithm's "up" side at lr x ratio). A group whose lr is 0 is left out."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

from . import blocks
from . import targets as tg
from .algos import Adapter

logger = logging.getLogger(__name__)

Groups = Tuple[List[dict], List[str]]


def split_plus(adapters: Sequence[Adapter], lr: Optional[float], ratio: Optional[float], label: str) -> Groups:
    """(groups, descriptions) of one set of adapters: plain tensors at lr, LoRA+ ones at lr x ratio."""
    plain, plus = [], []
    for a in adapters:
        plus_names = set(a.plus_suffixes)
        for pname, p in a.named_parameters():
            (plus if ratio is not None and pname in plus_names else plain).append(p)
    groups, descriptions = [], []
    for params, desc, factor in ((plain, label, 1.0), (plus, f"{label} plus", ratio)):
        if not params:
            continue
        group = {"params": params}
        if lr is not None:
            group["lr"] = lr * factor
            if group["lr"] == 0:
                logger.info(f"lycoris_kohya: {desc} has learning rate 0; left out of the optimizer")
                continue
        groups.append(group)
        descriptions.append(desc)
    return groups, descriptions


def param_groups(te_adapters: Sequence[Adapter], unet_adapters: Sequence[Adapter], te_prefixes: Optional[Sequence[str]],
                 te_lrs: Sequence[float], unet_lr: Optional[float], default_lr: Optional[float],
                 te_ratio: Optional[float], unet_ratio: Optional[float],
                 block_lr_weight: Optional[Sequence[float]], is_sdxl: bool) -> Groups:
    """Text encoder i (its place in the trainer's list, ``te_prefixes``: e.g. Flux CLIP-L 0, T5-XXL 1;
    SD3 CLIP-L 0, CLIP-G 1, T5-XXL 2) gets ``te_lrs[i]``, or the last entry if the list is shorter,
    as sd-scripts' own LoRA does; an lr of None falls back to ``default_lr``."""
    groups: List[dict] = []
    descriptions: List[str] = []

    def add(gd: Groups) -> None:
        groups.extend(gd[0])
        descriptions.extend(gd[1])

    by_prefix: Dict[str, List[Adapter]] = {}
    for a in te_adapters:
        by_prefix.setdefault(tg.te_prefix_of(a.lora_name), []).append(a)
    order = list(te_prefixes or sorted(by_prefix))
    for i, (prefix, adapters) in enumerate(sorted(by_prefix.items())):
        at = order.index(prefix) if prefix in order else i
        lr = te_lrs[at] if at < len(te_lrs) else (te_lrs[-1] if te_lrs else default_lr)
        add(split_plus(adapters, lr, te_ratio, "textencoder" if len(by_prefix) == 1 else f"textencoder {i + 1}"))
    lr = unet_lr if unet_lr is not None else default_lr
    if unet_adapters and block_lr_weight is None:
        add(split_plus(unet_adapters, lr, unet_ratio, "unet"))
    elif unet_adapters:  # one group per block, lr x the block's weight (kohya's block lr)
        by_block: Dict[int, List[Adapter]] = {}
        for a in unet_adapters:
            by_block.setdefault(blocks.block_index(a.lora_name, is_sdxl), []).append(a)
        for idx, adapters in sorted(by_block.items()):
            weight = block_lr_weight[idx] if idx >= 0 else 1.0
            add(split_plus(adapters, None if lr is None else lr * weight, unet_ratio, f"unet_block{idx}"))
    return groups, descriptions
