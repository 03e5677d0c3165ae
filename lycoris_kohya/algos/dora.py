"""DoRA (weight decomposition) over any algorithm's delta.

    V   = W0 + g*dW
    W_d = V * dora_scale / ||V||      (norm per input column, or per output row)
    W   = W0 + m * (W_d - W0)          (m = multiplier: m=0 is exactly W0)

``DoRA`` is what an adapter holds when it decomposes: the axis and the norm option. It needs of the algorithm only ``delta`` and, where there is one, its product form
(``factored``) for norms without a dense dW (``dora_norms``). The magnitude ``dora_scale`` is a
parameter of the adapter (the file's key ``<module>.dora_scale``), so it moves with ``.to(device)``.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import foreign
from .algorithm import Kron, LowRank
from .dora_norms import (INPUT, OUTPUT, axis_of, direction_factor, kron_scale, norm_dims, pair_scale,
                         scale_shape, weight_norm, weight_sq)
from .torch_ops import is_compiling, no_autocast


def merge(
    w0: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, axis: str, multiplier: float,
    detach_norm: bool = False,
) -> torch.Tensor:
    """W0 + m * (V * magnitude / ||V|| - W0) with V = W0 + g*dW."""
    v = w0 + scaled_delta
    return w0 + multiplier * (v * direction_factor(w0, scaled_delta, magnitude, axis, detach_norm) - w0)


class DoRA:
    """The decomposition of one adapter (see the module docstring).

    Forward, with s = dora_scale/||V|| and W' the weight below:
      input axis (scaling input columns commutes with the layer)
          y = below((1 - m + m*s) * x) + m*g*dW(s*x)
      output axis
          y = below(x) + m*((s - 1) * (below(x) - bias) + s * g*dW(x))
    Over a forward below that is not a weight (an unknown hook), its output is kept as it is and
    this adds m*(W_d - W0)x with the norm taken of the weight of the layer's own forward W0 (a
    quantised layer's dequantised weight, never its fp8 tensor: ``foreign.stored_weight``)."""

    def __init__(self, axis: str, detach_norm: bool = False):
        norm_dims(2, axis)  # checks the axis
        self.axis = axis
        self.detach_norm = detach_norm

    def magnitude(self, w0: torch.Tensor) -> torch.Tensor:
        """The initial dora_scale: ||W0|| on the axis, fp32."""
        return weight_norm(w0.detach().float(), self.axis).to(torch.float32)

    def merge(self, w0: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, m,
              detach_norm: bool = False) -> torch.Tensor:
        return merge(w0, scaled_delta, magnitude, self.axis, m, detach_norm=detach_norm)

    # ----- the norms -------------------------------------------------------------------------
    def tensors(self, a) -> Dict[str, torch.Tensor]:
        """The adapter's tensors; in training with rank_dropout, one mask per step over the rank
        components with the 1/(1-p) rescale (the norm is of one weight, so the mask cannot differ
        per sample)."""
        t = dict(a.tensors())
        if a.training and a.rank_dropout is not None:
            key, dim = a.algorithm.components(t)
            keep = (torch.rand(t[key].shape[dim], device=t[key].device) > a.rank_dropout).to(t[key].dtype)
            shape = [1] * t[key].dim()
            shape[dim] = -1
            t[key] = t[key] * keep.reshape(shape) / (1.0 - a.rank_dropout)
        return t

    def w0_sq(self, w: torch.Tensor) -> torch.Tensor:
        """||W0||^2 on the axis, flat, of the weight as it is now. Not cached: a change through
        ``.data`` (``weight.data.add_``), a block-swap buffer reused for another block's weight, or a
        merge by another tool bumps no version counter a cache could key on, and one read of W0 costs
        little next to the norms' products with it."""
        return weight_sq(w.detach() if not w.requires_grad else w, self.axis).flatten()

    def factor(self, a, t: Dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """s = dora_scale / ||base + g*dW|| per input column or output row, flat, fp32: from the
        algorithm's product form where it has one (no dense V), else from a dense delta that
        backward recomputes instead of storing."""
        g, algorithm, gain = a.geometry, a.algorithm, a.gain()
        magnitude = a.dora_scale.float().flatten()
        with no_autocast(base.device.type):
            form = algorithm.factored(t, g)
            if form is not None:
                w0_sq = self.w0_sq(base)
                if isinstance(form, LowRank):
                    return pair_scale(form.p, form.q, base.flatten(1), w0_sq, magnitude, self.axis, gain,
                                      self.detach_norm)
                if isinstance(form, Kron):
                    return kron_scale(form.w1, form.w2, base.flatten(1), w0_sq, magnitude, self.axis, gain,
                                      self.detach_norm)
                raise TypeError(f"{algorithm.name}: unknown product form {type(form).__name__}")
            names = list(t)

            def norms(*ps: torch.Tensor) -> torch.Tensor:
                d = algorithm.delta(dict(zip(names, ps)), g.weight_shape).reshape(g.weight_shape)
                return weight_norm(base.float() + gain * d.float(), self.axis).flatten()

            ps = [v.float() for v in t.values()]
            if a.grad_wanted() and not is_compiling():
                from torch.utils.checkpoint import checkpoint

                n = checkpoint(norms, *ps, use_reentrant=False)
            else:
                n = norms(*ps)
            if self.detach_norm:
                n = n.detach()
            return magnitude / n

    # ----- the forward -----------------------------------------------------------------------
    def forward(self, a, x: torch.Tensor, m, args, kwargs) -> torch.Tensor:
        t = self.tensors(a)
        if a.folds(x, args, kwargs, dora=True):
            return a.folded(x, t, m)
        g = a.geometry
        below = a.weight_below()
        known = below is not None
        w0 = below if known else foreign.stored_weight(a.layer)
        s = self.factor(a, t, w0)
        gain = m * a.gain()
        if self.axis == INPUT:
            sx = x * g.channel_view(s, x).to(x.dtype)
            out = a.delta_out(sx, t, gain, per_sample=False)
            if not known:
                x_rest = x * g.channel_view(s - 1, x).to(x.dtype)
                return a.base_forward(x, *args, **kwargs) + m * g.apply(x_rest, w0.to(x.dtype)) + out
            if not isinstance(m, torch.Tensor) and m == 1.0:
                return a.base_forward(sx, *args, **kwargs) + out
            xb = x * g.channel_view(1 - m + m * s, x).to(x.dtype)
            return a.base_forward(xb, *args, **kwargs) + out
        y = a.base_forward(x, *args, **kwargs)
        if known:
            bias = a.layer.bias
            y0 = y if bias is None else y - g.channel_view(bias, y).to(y.dtype)
        else:
            y0 = g.apply(x, w0.to(x.dtype))
        sv = g.channel_view(s, y).to(y.dtype)
        return y + m * ((sv - 1) * y0) + sv * a.delta_out(x, t, gain, per_sample=False)


__all__ = ["DoRA", "INPUT", "OUTPUT", "axis_of", "direction_factor", "merge", "norm_dims", "scale_shape",
           "weight_norm"]
