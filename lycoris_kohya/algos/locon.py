"""LoCon: LoRA for Linear and Conv2d layers, with optional Tucker (CP) decomposition for kxk convs.

Stored tensors (LyCORIS / kohya format):
  Linear          lora_down.weight [r, in]           lora_up.weight [out, r]
  Conv            lora_down.weight [r, in, kh, kw]    lora_up.weight [out, r, 1, 1]
  Conv (Tucker)   lora_down.weight [r, in, 1, 1]      lora_mid.weight [r, r, kh, kw]   lora_up.weight [out, r, 1, 1]
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dora as dora_math
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


# ----- the trainable adapter -----------------------------------------------------------------
class _Weight(nn.Module):
    """Holds one tensor as ``.weight`` so the state dict key is ``lora_down.weight`` etc."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t)


class LoConAdapter(Adapter):
    algo = "locon"
    delta_fn = staticmethod(delta)
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

    def delta_norm(self) -> float:
        """||g * up @ down||_F from the r x r Gram matrices, without building dW:
        ||U D||^2 = sum((U^T U) * (D D^T))."""
        if self.lora_mid is not None:
            return super().delta_norm()
        u = self.lora_up.weight.detach().flatten(1).double()
        d = self.lora_down.weight.detach().flatten(1).double()
        sq = float(((u.T @ u) * (d @ d.T)).sum().clamp_min(0.0))
        s = self.scale * (1.0 if self.scalar is None else float(self.scalar))
        return abs(s) * sq ** 0.5

    def training_delta(self) -> torch.Tensor:
        # rank dropout in weight space (used by DoRA): drop whole rank components
        if not (self.training and self.rank_dropout is not None):
            return self.delta()
        keep = (torch.rand(self._rank, device=self.lora_up.weight.device) > self.rank_dropout)
        t = dict(self.tensors())
        t[UP] = t[UP] * keep.to(t[UP].dtype).view(1, -1, *([1] * (t[UP].dim() - 2))) / (1.0 - self.rank_dropout)
        return self.delta(t)

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """g * up(mid(down(x))), with the training dropouts: the delta's output without ever
        building dW."""
        g = self.geometry
        dt = x.dtype
        down = self.lora_down.weight.to(dt)
        if not g.is_conv:
            h = F.linear(x, down)
        elif self.use_tucker:
            h = F.conv2d(x, down)
            h = F.conv2d(h, self.lora_mid.weight.to(dt), None, g.stride, g.padding, g.dilation)
        else:
            h = F.conv2d(x, down, None, g.stride, g.padding, g.dilation)

        scale = self.scale
        if self.training:
            if self.dropout is not None:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout is not None:
                # one mask per sample and rank, as kohya's networks.lora does
                shape = (h.shape[0], self._rank, 1, 1) if g.is_conv else (h.shape[0], *([1] * (h.dim() - 2)), self._rank)
                mask = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
                h = h * mask
                scale = scale / (1.0 - self.rank_dropout)

        up = self.lora_up.weight.to(dt)
        out = F.conv2d(h, up) if g.is_conv else F.linear(h, up)
        if self.scalar is not None:
            out = out * self.scalar.to(dt)
        return out * scale

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + m * g * up(mid(down(x))): the low-rank path beside the base layer."""
        return self.base_forward(x) + self.multiplier * self.lowrank(x)

    def dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA from the base layer's own output, with no second full-size op.

        s = magnitude / ||W0 + g*dW|| (computed once, in fp32). Input axis (m = 1): scaling input
        columns commutes with the layer, so y = base(s*x) + g*dW(s*x). Output axis (any m):
        y = base(x) + m * ((s - 1) * (base(x) - bias) + s * g*dW(x)). Other cases (input axis at
        0 < m < 1, rank dropout, which acts on the weight here) use the merged weight."""
        axis = self.dora_axis
        if (self.training and self.rank_dropout is not None) or (axis == dora_math.INPUT and self.multiplier != 1):
            return super().dora_forward(x)
        w0 = self.layer.weight
        s = dora_math.direction_factor(w0.float(), self.delta().float(), self.dora_scale.float(), axis,
                                       detach_norm=self.dora_detach_norm)
        g = self.geometry
        if axis == dora_math.INPUT:
            s = s.reshape(1, -1, 1, 1) if g.is_conv else s.reshape(-1)
            xs = x * s.to(x.dtype)
            return self.base_forward(xs) + self.lowrank(xs)
        s = (s.reshape(1, -1, 1, 1) if g.is_conv else s.reshape(-1)).to(x.dtype)
        y = self.base_forward(x)
        bias = self.layer.bias
        y0 = y if bias is None else y - (bias.reshape(1, -1, 1, 1) if g.is_conv else bias).to(y.dtype)
        return y + self.multiplier * ((s - 1) * y0 + s * self.lowrank(x))
