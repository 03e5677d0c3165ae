"""Other trainers' modules that hook a layer's forward the way ours do, recognised by what they
hold, so that an adapter of ours installed over one knows the weight its forward behaves as.

sd-scripts' ``networks.lora.LoRAModule`` replaces ``layer.forward`` with
``org_forward(x) + up(down(x)) * multiplier * scale`` (its dropouts aside): a LoCon change of the
weight below it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .locon import DOWN, LOCON, UP


def is_kohya_lora(owner: object) -> bool:
    down, up = getattr(owner, "lora_down", None), getattr(owner, "lora_up", None)
    return hasattr(owner, "org_forward") and hasattr(down, "weight") and hasattr(up, "weight")


def forward_below(owner: object) -> Optional[Callable]:
    """The forward a recognised module calls below itself, or None when ``owner`` is not one."""
    return owner.org_forward if is_kohya_lora(owner) else None


def weight_over(owner: object, below: torch.Tensor) -> torch.Tensor:
    """The weight a recognised module's forward behaves as over the weight ``below`` (fp32)."""
    if not getattr(owner, "enabled", True):
        return below
    t = {DOWN: owner.lora_down.weight.detach().float(), UP: owner.lora_up.weight.detach().float()}
    d = LOCON.delta(t, below.shape)
    return below.float() + float(owner.multiplier) * float(owner.scale) * d
