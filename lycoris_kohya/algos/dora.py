"""DoRA (weight decomposition) over any algorithm's delta.

    V   = W0 + g*dW
    W_d = V * dora_scale / ||V||      (norm per input column, or per output row)
    W   = W0 + m * (W_d - W0)          (m = multiplier: m=0 is exactly W0)

The axis is recorded by ``dora_scale``'s shape: ``[1, in]`` / ``[1, in, 1, 1]`` for the input axis
(what ComfyUI and A1111 both compute identically), ``[out, 1]`` / ``[out, 1, 1, 1]`` for the output
axis (the DoRA paper's and peft's).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .torch_ops import weight_mm

INPUT = "input"
OUTPUT = "output"


def norm_dims(ndim: int, axis: str) -> tuple:
    if axis == INPUT:
        return (0, *range(2, ndim))  # over out and kernel dims: one norm per input column
    if axis == OUTPUT:
        return tuple(range(1, ndim))  # one norm per output row
    raise ValueError(f"unknown DoRA axis {axis!r}; expected {INPUT!r} or {OUTPUT!r}")


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """||w|| on the axis, keepdim, computed in fp32; shaped as ``dora_scale`` is stored."""
    return torch.linalg.vector_norm(w.float(), dim=norm_dims(w.dim(), axis), keepdim=True)


def scale_shape(weight_shape: Sequence[int], axis: str) -> tuple:
    shape = [1] * len(weight_shape)
    i = 1 if axis == INPUT else 0
    shape[i] = weight_shape[i]
    return tuple(shape)


def axis_of(scale_shape_: Sequence[int], weight_shape: Sequence[int]) -> str:
    """The axis a stored ``dora_scale`` means, from its shape alone."""
    s, w = tuple(scale_shape_), tuple(weight_shape)
    if len(s) == len(w) and s == scale_shape(w, INPUT):
        return INPUT
    if len(s) == len(w) and s == scale_shape(w, OUTPUT):
        return OUTPUT
    raise ValueError(f"dora_scale of shape {list(s)} fits neither axis of a weight {list(w)}")


def direction_factor(
    w0: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, axis: str, detach_norm: bool = False,
) -> torch.Tensor:
    """magnitude / ||W0 + g*dW|| on the axis, shaped like ``dora_scale`` (computed once per call).
    ``detach_norm`` treats the norm as a constant in backward (the DoRA paper, section 4.3)."""
    n = weight_norm(w0 + scaled_delta, axis)
    if detach_norm:
        n = n.detach()
    return magnitude.reshape(n.shape) / n


def norm_from_shift(w_sq: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """||W + g*dW|| on the axis, flat, from ||W||^2 (one per channel) and the change of the squared
    norms per flattened column or row (a conv's kernel positions, adjacent, summed into their channel)."""
    group = shift.shape[0] // w_sq.shape[0]
    if group > 1:
        shift = shift.reshape(-1, group).sum(1)
    return (w_sq + shift).clamp_min(1e-24).sqrt()  # the clamp guards a zero column


def _pair_terms(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor, gain) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Z, (P P^T) Q) with Z = 2g*P W + g^2*(P P^T) Q: for dW = P^T Q ([R, rows]^T [R, cols]) and W
    [rows, cols], ||W_j + g*dW_j||^2 - ||W_j||^2 = sum_R (Z * Q)[:, j] per column j (gain: a number,
    or a tensor with use_scalar)."""
    pq = (p @ p.T) @ q
    pw = weight_mm(p, w.to(p.dtype))  # the factors' precision (fp32 in training); W itself may be half
    return 2 * gain * pw + gain * gain * pq, pq


def _pair_norm(p, q, w, w_sq, gain) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||W + g*P^T Q|| per column or per channel of columns, Z, (P P^T) Q)."""
    z, pq = _pair_terms(p, q, w, gain)
    return norm_from_shift(w_sq, (z * q).sum(0)), z, pq


class _PairScale(torch.autograd.Function):
    """magnitude / ||W + g*P^T Q|| per column (adjacent columns per norm: a conv's kernel positions),
    with a hand-written backward: one node instead of about ten, and no saved temporaries beyond Z
    and (P P^T) Q; W is kept in its own dtype and cast again in backward. The norms' only reads of W
    are P W forward and (c*Q) W^T backward."""

    @staticmethod
    def forward(ctx, p, q, w, w_sq, magnitude, gain: float):
        n, z, pq = _pair_norm(p, q, w, w_sq, gain)
        s = magnitude / n
        ctx.save_for_backward(p, q, w, z, pq, n, s)
        ctx.gain = gain
        return s

    @staticmethod
    def backward(ctx, grad_s):
        p, q, w, z, pq, n, s = ctx.saved_tensors
        g, group = ctx.gain, q.shape[1] // n.shape[0]
        c = grad_s * s / (-2 * n * n)  # dL/d(n^2)
        cols = c if group == 1 else c.repeat_interleave(group)
        cq = q * cols
        # d/dQ of sum_j c_j (Z*Q)_j = c * (2gPW + 2g^2 PP^T Q); d/dP = 2g (cQ) W^T + 2g^2 (cQ Q^T) P
        grad_q = torch.add(z, pq, alpha=g * g).mul_(cols)
        grad_p = weight_mm(cq, w.to(p.dtype).T).mul_(2 * g).add_((cq @ q.T) @ p, alpha=2 * g * g)
        grad_w = (2 * g * (p.T @ cq)).to(w.dtype) if ctx.needs_input_grad[2] else None
        grad_w_sq = c if ctx.needs_input_grad[3] else None
        return grad_p, grad_q, grad_w, grad_w_sq, grad_s / n, None


def pair_scale(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor, w_sq: torch.Tensor, magnitude: torch.Tensor,
               axis: str, gain, detach_norm: bool = False) -> torch.Tensor:
    """s = magnitude / ||W + g*dW|| on the axis, flat, for dW = P^T Q on the flattened [out, in*k]
    weight W (any dtype, used in the factors' dtype; P [R, out], Q [R, in*k], fp32), from P W (or Q W^T) and R x R Gram matrices,
    without building dW. ``w_sq`` is ||W||^2 on the axis, flat."""
    if axis == OUTPUT:  # the rows of W are the columns of W^T = Q^T P + ...
        p, q, w = q, p, w.T
    magnitude = magnitude.flatten()
    if detach_norm or isinstance(gain, torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_norm):
            n = _pair_norm(p, q, w, w_sq, gain)[0]
        return magnitude / n
    return _PairScale.apply(p, q, w, w_sq, magnitude, gain)


def merge(
    w0: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, axis: str, multiplier: float,
    detach_norm: bool = False,
) -> torch.Tensor:
    """W0 + m * (V * magnitude / ||V|| - W0) with V = W0 + g*dW."""
    v = w0 + scaled_delta
    return w0 + multiplier * (v * direction_factor(w0, scaled_delta, magnitude, axis, detach_norm) - w0)
