"""Other trainers' modules that hook a layer's forward the way ours do, recognised by what they
hold, so that an adapter of ours installed over one knows the weight its forward behaves as.

sd-scripts' ``networks.lora.LoRAModule`` replaces ``layer.forward`` with
``org_forward(x) + up(down(x)) * multiplier * scale`` (its dropouts aside): a LoCon change of the
weight below it.

musubi-tuner's ``--fp8_scaled`` (``modules/fp8_optimization_utils.apply_fp8_monkey_patch``) stores a
Linear's weight as float8 with a ``scale_weight`` buffer, in the compute dtype, of shape ``[]`` /
``[1]`` (per tensor), ``[out, 1]`` (per output row) or ``[out, blocks, 1]`` (per block of
``in / blocks`` inputs along each row), and replaces ``forward`` on the instance with one that
dequantises, ``weight.to(scale.dtype) * scale`` (block-wise through a ``[out, blocks, in/blocks]``
view), and calls ``F.linear`` (its ``_scaled_mm`` variant is the same product, per tensor only; the
Kandinsky 5 trainer's own patch dequantises in fp32, which the same rule gives for its fp32 scale).
That forward is the layer's own: the weight it behaves as is the dequantised one, which is what
DoRA's norms and every merged weight must be taken of. Its stored fp8 tensor is never the weight.

sd-scripts' and musubi's plain ``--fp8_base`` (no scale) store the weight as float8 and run it under
autocast: the fp8 values are the weight, read upcast.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .locon import DOWN, LOCON, UP

SCALE = "scale_weight"


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


# ----- quantised bases -----------------------------------------------------------------------
def is_quantised(t: torch.Tensor) -> bool:
    """An fp8 (or other one-byte floating) tensor: stored values, not necessarily the weight."""
    return t.is_floating_point() and t.element_size() == 1


def scale_of(layer: object) -> Optional[torch.Tensor]:
    """The ``scale_weight`` buffer of a musubi ``--fp8_scaled`` layer, or None."""
    buffers = getattr(layer, "_buffers", None)
    return buffers.get(SCALE) if isinstance(buffers, dict) else None


def is_fp8_scaled(layer: object) -> bool:
    """A layer whose stored weight is quantised through its own ``scale_weight`` (musubi's
    --fp8_scaled): its forward is the dequantising one, never the class's."""
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and scale_of(layer) is not None


def dequantised(layer) -> torch.Tensor:
    """The weight a ``--fp8_scaled`` layer's forward computes, detached: ``weight`` in the scale's
    dtype times ``scale_weight``, exactly as the patched forward rounds it (block-wise through the
    ``[out, blocks, in/blocks]`` view), and in that dtype (the compute dtype: bf16 in musubi's usual
    runs), not fp32: DoRA's norms save it for backward, at half the memory; every reader upcasts.
    Read at every call, never cached: block swap replaces ``weight.data`` between calls (the scale,
    a buffer, stays), and the storage a block leaves is refilled with another block's weight."""
    w, s = layer.weight.detach(), scale_of(layer).detach()
    s = s.to(w.device)
    name = type(layer).__name__
    if s.dim() < 3:
        if w.dim() != 2 or not (s.numel() == 1 or tuple(s.shape) == (w.shape[0], 1)):
            raise ValueError(f"{name} with weight {list(w.shape)}: scale_weight of shape {list(s.shape)} is "
                             "neither per tensor ([] or [1]) nor per output row ([out, 1])")
        d = w.to(s.dtype) * s
    else:
        out, blocks = s.shape[0], s.shape[1]
        if (w.dim() != 2 or s.dim() != 3 or s.shape[2] != 1 or out != w.shape[0] or blocks < 1
                or w.shape[1] % blocks):
            raise ValueError(f"{name} with weight {list(w.shape)}: block-wise scale_weight of shape "
                             f"{list(s.shape)} is not [out, blocks, 1] with blocks dividing in")
        d = (w.to(s.dtype).contiguous().view(out, blocks, -1) * s).view(w.shape)
    return d


def stored_weight(layer) -> torch.Tensor:
    """The weight a layer's own forward (below every hook) behaves as: the dequantised weight of a
    ``--fp8_scaled`` layer (``dequantised``), else ``layer.weight`` itself (plain ``--fp8_base``
    included: its fp8 values are the weight)."""
    if is_fp8_scaled(layer):
        return dequantised(layer)
    return layer.weight


def cannot_merge_into_fp8_scaled(names: Sequence[str]) -> ValueError:
    """The error for a merge into layers stored quantised with a scale_weight (raised before any
    layer is written)."""
    which = (f"its adapted layer {names[0]} is" if len(names) == 1 else
             f"{len(names)} of its adapted layers (e.g. {names[0]}) are")
    return ValueError(
        f"cannot merge into this model: {which} stored quantised with a scale_weight (musubi-tuner's "
        "--fp8_scaled), and a merged weight written into the fp8 tensor would be read times the scale; merge "
        "into the unquantised model (load it without --fp8_scaled), or keep the network as hooks. Nothing was "
        "merged.")
