"""LoCon: LoRA for Linear and Conv2d layers, with optional Tucker (CP) decomposition for kxk convs.

Stored tensors (LyCORIS / kohya format):
  Linear          lora_down.weight [r, in]           lora_up.weight [out, r]
  Conv            lora_down.weight [r, in, kh, kw]    lora_up.weight [out, r, 1, 1]
  Conv (Tucker)   lora_down.weight [r, in, 1, 1]      lora_mid.weight [r, r, kh, kw]   lora_up.weight [out, r, 1, 1]

Rank components (what rank_dropout drops): the r columns of ``lora_up``.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, LayerGeometry, kaiming

DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"
SUFFIXES = (DOWN, UP, MID)


# ----- math: the one definition --------------------------------------------------------------
def delta(t: Mapping[str, torch.Tensor], weight_shape: Sequence[int]) -> torch.Tensor:
    """dW (unscaled) shaped like the base weight."""
    up, down = t[UP].flatten(1), t[DOWN].flatten(1)
    mid = t.get(MID)
    if mid is None:
        return (up @ down).reshape(weight_shape)
    # dW[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]
    return torch.einsum("oa,abhw,bi->oihw", up, mid, down).reshape(weight_shape)


def layout(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> Dict[str, object]:
    """Rank and options of stored tensors; raises ValueError when they don't fit the layer."""
    if DOWN not in t or UP not in t:
        raise ValueError(f"LoCon needs both {DOWN} and {UP}")
    down, up, mid = t[DOWN], t[UP], t.get(MID)
    r = down.shape[0]
    tucker = mid is not None
    if tucker:
        want_down, want_mid = (r, g.in_dim, 1, 1), (r, r, *g.kernel)
        if not g.is_kxk or tuple(down.shape) != want_down or tuple(mid.shape) != want_mid:
            raise ValueError(f"Tucker LoCon shapes down {list(down.shape)} mid {list(mid.shape)} do not fit {list(g.weight_shape)}")
    else:
        want_down = (r, g.in_dim, *g.kernel)
        if tuple(down.shape) != want_down:
            raise ValueError(f"{DOWN} has shape {list(down.shape)}, the layer needs {list(want_down)}")
    want_up = (g.out_dim, r, 1, 1) if g.is_conv else (g.out_dim, r)
    if tuple(up.shape) != want_up:
        raise ValueError(f"{UP} has shape {list(up.shape)}, the layer needs {list(want_up)}")
    return {"rank": r, "use_tucker": tucker}


# ----- structured forms of the same map (tested against delta()) ------------------------------
def components(t: Mapping[str, torch.Tensor]) -> Tuple[str, int]:
    """(tensor, dim): the rank components are its slices along dim."""
    return UP, 1


def apply(t: Mapping[str, torch.Tensor], x: torch.Tensor, g: LayerGeometry, out_scale,
          hidden: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None) -> torch.Tensor:
    """out_scale * dW(x) = out_scale * up(mid(down(x))) without building dW, in x's dtype.
    ``hidden(h, dim)`` sees the rank activation (components along ``dim``, samples along 0)."""
    dt = x.dtype
    down = t[DOWN].to(dt)
    up = t[UP].to(dt) * out_scale
    if not g.is_conv:
        h = F.linear(x, down)
        if hidden is not None:
            h = hidden(h, h.dim() - 1)
        return F.linear(h, up)
    if MID in t:
        h = F.conv2d(x, down)
        h = F.conv2d(h, t[MID].to(dt), None, g.stride, g.padding, g.dilation)
    else:
        h = F.conv2d(x, down, None, g.stride, g.padding, g.dilation)
    if hidden is not None:
        h = hidden(h, 1)
    return F.conv2d(h, up)


def costs(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> Tuple[int, int]:
    """(multiply-adds per output position of apply(), multiply-adds to build dW densely)."""
    r, k = t[DOWN].shape[0], g.kernel_area
    if MID in t:
        per = r * g.in_dim + r * r * k + r * g.out_dim
        build = r * r * k * g.in_dim + g.out_dim * r * g.in_dim * k
    else:
        per = r * g.in_dim * k + r * g.out_dim
        build = g.out_dim * r * g.in_dim * k
    return per, build


def norm_sq(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> torch.Tensor:
    """||dW||_F^2 from r x r Gram matrices, never building dW: ||U D||^2 = sum((U^T U) * (D D^T));
    with Tucker, per kernel position ||U M_hw D||^2 = sum(((U^T U) M_hw) * (M_hw (D D^T)))."""
    u, d = t[UP].flatten(1), t[DOWN].flatten(1)
    gu, gd = u.T @ u, d @ d.T
    if MID not in t:
        return (gu * gd).sum()
    m = t[MID].permute(2, 3, 0, 1)  # [kh, kw, r, r]
    return ((gu @ m) * (m @ gd)).sum()


def dora_pair(t: Mapping[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(P, Q) with dW = P^T Q on the flattened [out, in*k] weight, in fp32, for DoRA's norms from
    factor identities (``dora.pair_scale``): (lora_up^T, lora_down); None for Tucker."""
    if MID in t:
        return None
    return t[UP].flatten(1).float().T, t[DOWN].flatten(1).float()


# ----- the trainable adapter -----------------------------------------------------------------
class _Weight(nn.Module):
    """Holds one tensor as ``.weight`` so the state dict key is ``lora_down.weight`` etc."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t)


class LoConAdapter(Adapter):
    algo = "locon"
    plus_suffixes = (UP,)
    zero_init = UP

    def __init__(self, name: str, layer: nn.Module, rank: int, alpha: float, use_tucker: bool = False,
                 use_scalar: bool = False, **kw):
        super().__init__(name, layer, alpha, use_scalar=use_scalar, **kw)
        g = self.geometry
        self.use_tucker = bool(use_tucker and g.is_kxk)
        if self.use_tucker:
            down = torch.empty(rank, g.in_dim, 1, 1)
            self.lora_mid = _Weight(kaiming(torch.empty(rank, rank, *g.kernel)))
        else:
            down = torch.empty(rank, g.in_dim, *g.kernel)
            self.lora_mid = None
        self.lora_down = _Weight(kaiming(down))
        up = torch.zeros(g.out_dim, rank, 1, 1) if g.is_conv else torch.zeros(g.out_dim, rank)
        self.lora_up = _Weight(kaiming(up) if use_scalar else up)
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    def tensors(self) -> Dict[str, torch.Tensor]:
        t = {DOWN: self.lora_down.weight, UP: self.lora_up.weight}
        if self.lora_mid is not None:
            t[MID] = self.lora_mid.weight
        return t
