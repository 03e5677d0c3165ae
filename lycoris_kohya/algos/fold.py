"""The folded forward: y = op(x, W) with W = W0 + m*g*dW (DoRA: W0 + m*(W_d - W0)) built from the
factors by a ``weight_fn``, one op in place of the layer's and the adapter's."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .geometry import LayerGeometry
from .torch_ops import autocast_dtype, is_compiling, no_autocast


class FoldedOp(torch.autograd.Function):
    """y = op(x, weight_fn(*params)) that stores x and the small params, not the dense weight:
    backward rebuilds the weight (token-independent) instead of keeping an out x in tensor per layer
    alive between forward and backward."""

    @staticmethod
    def forward(ctx, x, bias, geometry, weight_fn, *params):
        with torch.no_grad():
            w = weight_fn(*params)
        ctx.geometry, ctx.weight_fn = geometry, weight_fn
        ctx.save_for_backward(x, bias, *params)
        return geometry.apply(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, bias, *params = ctx.saved_tensors
        g: LayerGeometry = ctx.geometry
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(p.requires_grad) for p in params]
            w = ctx.weight_fn(*ps)
        wx = w.detach().to(x.dtype)
        gx = gw = gb = None
        if g.is_conv:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, wx, None if bias is None else [bias.shape[0]], list(g.stride), list(g.padding),
                list(g.dilation), False, [0, 0], 1, [ctx.needs_input_grad[0], True, ctx.needs_input_grad[1]])
        else:
            gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[0]:
                gx = (gy2 @ wx).reshape(x.shape)
            gw = gy2.T @ x2
            if ctx.needs_input_grad[1]:
                gb = gy2.sum(0)
        wanted = [p for p in ps if p.requires_grad]
        got = iter(torch.autograd.grad(w, wanted, gw.to(w.dtype), allow_unused=True) if wanted else ())
        grads = [next(got) if p.requires_grad else None for p in ps]
        return (gx, None if gb is None else gb.to(bias.dtype), None, None, *grads)


def folded_forward(x: torch.Tensor, bias: Optional[torch.Tensor], g: LayerGeometry,
                   weight_fn: Callable[..., torch.Tensor], params, grad_wanted: bool) -> torch.Tensor:
    """op(x, weight_fn(*params)) in autocast's dtype (or x's), the weight built in fp32 by weight_fn.
    Without a gradient, under torch.compile, or with string padding, plain ops; else ``FoldedOp``."""
    cdt = autocast_dtype(x.device.type) or x.dtype
    with no_autocast(x.device.type):
        if not grad_wanted or is_compiling() or isinstance(g.padding, str):
            return g.apply(x.to(cdt), weight_fn(*params).to(cdt), None if bias is None else bias.to(cdt))
        return FoldedOp.apply(x.to(cdt), bias, g, weight_fn, *params)
