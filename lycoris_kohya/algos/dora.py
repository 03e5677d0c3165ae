"""DoRA (weight decomposition) over any algorithm's delta.

    V   = W0 + g*dW
    W_d = V * dora_scale / ||V||      (norm per input column, or per output row)
    W   = W0 + m * (W_d - W0)          (m = multiplier: m=0 is exactly W0)

The axis is recorded by ``dora_scale``'s shape: ``[1, in]`` / ``[1, in, 1, 1]`` for the input axis
(what ComfyUI and A1111 both compute identically), ``[out, 1]`` / ``[out, 1, 1, 1]`` for the output
axis (the DoRA paper's and peft's).
"""
from __future__ import annotations

from typing import Sequence

import torch

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


def shift(products: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gain) -> torch.Tensor:
    """2*gain*(a @ b) + gain^2 * products: the terms of ||W0 + g*dW||^2 - ||W0||^2 before the last
    elementwise product with a factor, as one addmm when gain is a number (a tensor with use_scalar)."""
    if isinstance(gain, torch.Tensor):
        return 2 * gain * (a @ b) + gain * gain * products
    return torch.addmm(products, a, b, beta=gain * gain, alpha=2 * gain)


def merge(
    w0: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, axis: str, multiplier: float,
    detach_norm: bool = False,
) -> torch.Tensor:
    """W0 + m * (V * magnitude / ||V|| - W0) with V = W0 + g*dW."""
    v = w0 + scaled_delta
    return w0 + multiplier * (v * direction_factor(w0, scaled_delta, magnitude, axis, detach_norm) - w0)
