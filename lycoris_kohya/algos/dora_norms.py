"""DoRA's norms: the axis a magnitude is taken on, and ||W0 + g*dW|| on it, directly or, for an
algorithm with a product form (``LowRank`` dW = P^T Q, ``Kron`` dW = kron(w1, w2)), from factor
identities without building dW (SPEC section 9):

    ||W_j + g dW_j||^2 = ||W_j||^2 + 2g <W_j, dW_j> + g^2 ||dW_j||^2

The axis is recorded by ``dora_scale``'s shape: ``[1, in]`` / ``[1, in, 1, 1]`` for the input axis
(what ComfyUI and A1111 both compute identically), ``[out, 1]`` / ``[out, 1, 1, 1]`` for the output
axis (the DoRA paper's and peft's).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


INPUT = "input"
OUTPUT = "output"


def norm_dims(ndim: int, axis: str) -> tuple:
    if axis == INPUT:
        return (0, *range(2, ndim))  # over out and kernel dims: one norm per input column
    if axis == OUTPUT:
        return tuple(range(1, ndim))  # one norm per output row
    raise ValueError(f"unknown DoRA axis {axis!r}; expected {INPUT!r} or {OUTPUT!r}")


_CPU_BLOCK = 1 << 20  # elements per block of rows summed at a time on the CPU (4 MiB in fp32)


def weight_sq(w: torch.Tensor, axis: str) -> torch.Tensor:
    """||w||^2 on the axis, keepdim, in fp32; shaped as
    ``dora_scale`` is stored. On the CPU the input axis (a sum down every column) is taken over
    blocks of rows: vector_norm over dim 0 there ran 5-8x slower than over the rows (2.4 ms against
    0.3-0.4 ms for a 1280x1280 weight, 25 ms against 8 ms for 1280x11520)."""
    dims = norm_dims(w.dim(), axis)
    if axis == OUTPUT or w.device.type != "cpu" or w.shape[0] == 1:
        return torch.linalg.vector_norm(w.float(), dim=dims, keepdim=True).square()
    flat = w.flatten(1)
    rows = max(1, _CPU_BLOCK // flat.shape[1])
    cols = sum(b.float().square().sum(0) for b in flat.split(rows))
    shape = scale_shape(w.shape, INPUT)
    return cols.reshape(w.shape[1], -1).sum(1).reshape(shape)


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """||w|| on the axis, keepdim, computed in fp32; shaped as ``dora_scale`` is stored. With a
    gradient, vector_norm's (its subgradient at a zero column is 0, sqrt's would be inf)."""
    if w.requires_grad and torch.is_grad_enabled():
        return torch.linalg.vector_norm(w.float(), dim=norm_dims(w.dim(), axis), keepdim=True)
    return weight_sq(w, axis).sqrt()


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
    pw = p @ w.to(p.dtype)  # the factors' precision (fp32 in training); W itself may be half
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
        grad_p = (cq @ w.to(p.dtype).T).mul_(2 * g).add_((cq @ q.T) @ p, alpha=2 * g * g)
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


def _kron_view(w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, axis: str) -> torch.Tensor:
    """The flattened [a*b, c*dk] weight, in the factors' dtype, as the batch of small matrices that
    meet w1 [a, c] in one pass, a view (no W-sized temporary when W is already in that dtype): input
    axis, batch (q, i) holds W[:, q, i, :] [a, dk]; output axis, batch (p, q) holds one row as [c, dk]."""
    (a, c), (b, dk) = w1.shape, w2.shape
    w = w.to(w1.dtype).contiguous()
    if axis == INPUT:
        return w.as_strided((b * c, a, dk), (dk, b * c * dk, 1))
    return w.reshape(a * b, c, dk)


def _kron_norm(w1, w2, w, w_sq, gain, axis) -> Tuple[torch.Tensor, torch.Tensor]:
    """(||W + g*kron(w1, w2)|| per column or row (per channel of columns), the partial sums S).
    With W[p,q,i,x] the flattened weight at row p*b+q, column i*dk+x:
      input:  S[q,i,x] = sum_p w1[p,i] W[p,q,i,x];  <W, dW>_(i,x) = sum_q w2[q,x] S[q,i,x];
              ||dW_(i,x)||^2 = (sum_p w1[p,i]^2) (sum_q w2[q,x]^2)
      output: S[p,q,x] = sum_i w1[p,i] W[p,q,i,x];  <W, dW>_(p,q) = sum_x w2[q,x] S[p,q,x];
              ||dW_(p,q)||^2 = (sum_i w1[p,i]^2) (sum_x w2[q,x]^2)"""
    (a, c), (b, dk) = w1.shape, w2.shape
    view = _kron_view(w, w1, w2, axis)
    if axis == INPUT:
        lhs = w1.T[None, :, None, :].expand(b, c, 1, a).reshape(b * c, 1, a)
        part = torch.bmm(lhs, view).reshape(b, c, dk)
        inner = (part * w2[:, None, :]).sum(0)
        sq = w1.pow(2).sum(0)[:, None] * w2.pow(2).sum(0)[None, :]
    else:
        lhs = w1[:, None, None, :].expand(a, b, 1, c).reshape(a * b, 1, c)
        part = torch.bmm(lhs, view).reshape(a, b, dk)
        inner = (part * w2[None]).sum(2)
        sq = w1.pow(2).sum(1)[:, None] * w2.pow(2).sum(1)[None, :]
    return norm_from_shift(w_sq, (2 * gain * inner + gain * gain * sq).flatten()), part


class _KronScale(torch.autograd.Function):
    """magnitude / ||W + g*kron(w1, w2)|| on the axis with a hand-written backward, as _PairScale
    for LoCon/LoHa: one node, the partial sums S saved (b*in or a*b*dk numbers), W read once
    forward and once backward, in its own dtype."""

    @staticmethod
    def forward(ctx, w1, w2, w, w_sq, magnitude, gain: float, axis: str):
        n, part = _kron_norm(w1, w2, w, w_sq, gain, axis)
        s = magnitude / n
        ctx.save_for_backward(w1, w2, w, part, n, s)
        ctx.gain, ctx.axis = gain, axis
        return s

    @staticmethod
    def backward(ctx, grad_s):
        w1, w2, w, part, n, s = ctx.saved_tensors
        g, axis = ctx.gain, ctx.axis
        (a, c), (b, dk) = w1.shape, w2.shape
        cn = grad_s * s / (-2 * n * n)  # dL/d(n^2)
        view = _kron_view(w, w1, w2, axis)
        if axis == INPUT:
            cols = cn.repeat_interleave(c * dk // n.shape[0]).reshape(c, dk)  # a conv's kernel positions
            u = w2[:, None, :] * cols  # [b, c, dk]
            wu = torch.bmm(u.reshape(b * c, 1, dk), view.transpose(1, 2)).reshape(b, c, a).sum(0).T  # sum_qx W c w2
            grad_w1 = wu.mul_(2 * g).add_(w1 * (cols * w2.pow(2).sum(0)).sum(1), alpha=2 * g * g)
            grad_w2 = (part * cols).sum(1).mul_(2 * g).add_(w2 * (cols * w1.pow(2).sum(0)[:, None]).sum(0),
                                                            alpha=2 * g * g)
            dense_c = cols.reshape(1, -1)
        else:
            rows = cn.reshape(a, b)
            u = rows[:, :, None] * w2[None]  # [a, b, dk]
            wu = torch.bmm(u.reshape(a * b, 1, dk), view.transpose(1, 2)).reshape(a, b, c).sum(1)
            grad_w1 = wu.mul_(2 * g).add_(w1 * (rows * w2.pow(2).sum(1)).sum(1)[:, None], alpha=2 * g * g)
            grad_w2 = (part * rows[:, :, None]).sum(0).mul_(2 * g).add_(
                w2 * (rows * w1.pow(2).sum(1)[:, None]).sum(0)[:, None], alpha=2 * g * g)
            dense_c = cn.reshape(-1, 1)
        grad_w = (2 * g * torch.kron(w1, w2) * dense_c).to(w.dtype) if ctx.needs_input_grad[2] else None
        grad_w_sq = cn if ctx.needs_input_grad[3] else None
        return grad_w1, grad_w2, grad_w, grad_w_sq, grad_s / n, None, None


def kron_scale(w1: torch.Tensor, w2: torch.Tensor, w: torch.Tensor, w_sq: torch.Tensor, magnitude: torch.Tensor,
               axis: str, gain, detach_norm: bool = False) -> torch.Tensor:
    """s = magnitude / ||W + g*dW|| on the axis, flat, for dW = kron(w1 [a, c], w2 [b, dk]) on the
    flattened [a*b, c*dk] weight W (any dtype; w1, w2 fp32), from one pass over W and the factors'
    squared sums, without building the Kronecker product. ``w_sq`` is ||W||^2 on the axis, flat."""
    magnitude = magnitude.flatten()
    if detach_norm or isinstance(gain, torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_norm):
            n = _kron_norm(w1, w2, w, w_sq, gain, axis)[0]
        return magnitude / n
    return _KronScale.apply(w1, w2, w, w_sq, magnitude, gain, axis)

