"""LoCon: LoRA for Linear and Conv2d layers, with optional Tucker (CP) decomposition for kxk convs.

Stored tensors (LyCORIS / kohya format):
  Linear          lora_down.weight [r, in]           lora_up.weight [out, r]
  Conv            lora_down.weight [r, in, kh, kw]    lora_up.weight [out, r, 1, 1]
  Conv (Tucker)   lora_down.weight [r, in, 1, 1]      lora_mid.weight [r, r, kh, kw]   lora_up.weight [out, r, 1, 1]

    dW = up @ down (flattened);   Tucker: dW[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]

Rank components (what rank_dropout drops): the r columns of ``lora_up``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, Hidden, Layout, LowRank, Shape, Tensors
from .geometry import LayerGeometry, kaiming

DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"


class LoCon(Algorithm):
    name = "locon"
    suffixes = (DOWN, UP, MID)
    plus = (UP,)

    # ----- layout (plan: the Algorithm default) ---------------------------------------------
    def init(self, layout: Layout, g: LayerGeometry, use_scalar: bool) -> Tuple[Dict[str, torch.Tensor], str]:
        r = layout.rank
        t: Dict[str, torch.Tensor] = {}
        if layout.tucker:
            down = torch.empty(r, g.in_dim, 1, 1)
            t[MID] = kaiming(torch.empty(r, r, *g.kernel))
        else:
            down = torch.empty(r, g.in_dim, *g.kernel)
        t[DOWN] = kaiming(down)
        up = torch.zeros(g.out_dim, r, 1, 1) if g.is_conv else torch.zeros(g.out_dim, r)
        t[UP] = kaiming(up) if use_scalar else up
        return t, UP

    def layout(self, t: Tensors, g: LayerGeometry) -> Layout:
        if DOWN not in t or UP not in t:
            raise ValueError(f"LoCon needs both {DOWN} and {UP}")
        down, up, mid = t[DOWN], t[UP], t.get(MID)
        r = down.shape[0]
        tucker = mid is not None
        if tucker:
            want_down, want_mid = (r, g.in_dim, 1, 1), (r, r, *g.kernel)
            if not g.is_kxk or tuple(down.shape) != want_down or tuple(mid.shape) != want_mid:
                raise ValueError(f"Tucker LoCon shapes down {list(down.shape)} mid {list(mid.shape)} "
                                 f"do not fit {list(g.weight_shape)}")
        else:
            want_down = (r, g.in_dim, *g.kernel)
            if tuple(down.shape) != want_down:
                raise ValueError(f"{DOWN} has shape {list(down.shape)}, the layer needs {list(want_down)}")
        want_up = (g.out_dim, r, 1, 1) if g.is_conv else (g.out_dim, r)
        if tuple(up.shape) != want_up:
            raise ValueError(f"{UP} has shape {list(up.shape)}, the layer needs {list(want_up)}")
        return Layout(r, tucker)

    def flat_shape(self, t: Tensors) -> Tuple[int, int]:
        up, down, mid = t[UP], t[DOWN], t.get(MID)
        k = math.prod(mid.shape[2:]) if mid is not None else 1
        return up.shape[0], down[0].numel() * k

    def weight_shape(self, t: Tensors) -> Optional[Shape]:
        up, down, mid = t[UP], t[DOWN], t.get(MID)
        if up.dim() == 2:
            return (up.shape[0], down.shape[1])
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        return (up.shape[0], down.shape[1], *kernel)

    def rank_bound(self, t: Tensors) -> int:
        return t[DOWN].shape[0]

    # ----- math ------------------------------------------------------------------------------
    def delta(self, t: Tensors, weight_shape: Sequence[int]) -> torch.Tensor:
        up, down = t[UP].flatten(1), t[DOWN].flatten(1)
        mid = t.get(MID)
        if mid is None:
            return (up @ down).reshape(weight_shape)
        return torch.einsum("oa,abhw,bi->oihw", up, mid, down).reshape(weight_shape)

    def apply(self, t: Tensors, x: torch.Tensor, g: LayerGeometry, out_scale, hidden: Hidden = None) -> torch.Tensor:
        """out_scale * up(mid(down(x))) in x's dtype."""
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

    def norm_sq(self, t: Tensors, g: LayerGeometry) -> torch.Tensor:
        """||U D||^2 = sum((U^T U) * (D D^T)); with Tucker, per kernel position
        ||U M_hw D||^2 = sum(((U^T U) M_hw) * (M_hw (D D^T)))."""
        u, d = t[UP].flatten(1), t[DOWN].flatten(1)
        gu, gd = u.T @ u, d @ d.T
        if MID not in t:
            return (gu * gd).sum()
        m = t[MID].permute(2, 3, 0, 1)  # [kh, kw, r, r]
        return ((gu @ m) * (m @ gd)).sum()

    def factored(self, t: Tensors, g: LayerGeometry) -> Optional[LowRank]:
        if MID in t:
            return None
        return LowRank(t[UP].flatten(1).float().T, t[DOWN].flatten(1).float())

    def components(self, t: Tensors) -> Tuple[str, int]:
        return UP, 1

    def costs(self, t: Tensors, g: LayerGeometry) -> Tuple[int, int]:
        r, k = t[DOWN].shape[0], g.kernel_area
        if MID in t:
            per = r * g.in_dim + r * r * k + r * g.out_dim
            build = r * r * k * g.in_dim + g.out_dim * r * g.in_dim * k
        else:
            per = r * g.in_dim * k + r * g.out_dim
            build = g.out_dim * r * g.in_dim * k
        return per, build


LOCON = LoCon()
