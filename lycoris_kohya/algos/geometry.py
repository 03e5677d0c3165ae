"""The layer an adapter wraps (a Linear or a Conv2d), as the numbers the algorithms need, and the
scale alpha/rank that every reader computes from a file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and op of the wrapped layer."""

    out_dim: int
    in_dim: int
    kernel: Tuple[int, ...] = ()  # () for Linear, (kh, kw) for Conv2d
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] | str = ()
    dilation: Tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return len(self.kernel) > 0

    @property
    def is_kxk(self) -> bool:
        return self.is_conv and tuple(self.kernel) != (1, 1)

    @property
    def kernel_area(self) -> int:
        return self.kernel[0] * self.kernel[1] if self.is_conv else 1

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_dim, self.in_dim, *self.kernel)

    @staticmethod
    def of(layer: nn.Module) -> "LayerGeometry":
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"grouped convolutions (groups={layer.groups}) are not supported")
            return LayerGeometry(
                layer.out_channels, layer.in_channels, tuple(layer.kernel_size),
                tuple(layer.stride), layer.padding, tuple(layer.dilation),
            )
        if isinstance(layer, nn.Linear):
            return LayerGeometry(layer.out_features, layer.in_features)
        raise TypeError(f"cannot adapt a {type(layer).__name__}; only Linear and Conv2d")

    @staticmethod
    def of_shape(shape: Tuple[int, ...]) -> "LayerGeometry":
        """The geometry of a weight shape alone ([out, in] or [out, in, kh, kw]), stride 1."""
        return LayerGeometry(int(shape[0]), int(shape[1]), tuple(int(s) for s in shape[2:]))

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's own op with another weight (same stride/padding/dilation)."""
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, weight, bias)

    def positions(self, x: torch.Tensor) -> int:
        """How many output positions (tokens, or pixels times batch) one call computes."""
        if not self.is_conv:
            return x.numel() // self.in_dim
        n, _, h, w = x.shape
        return max(1, n * h * w // (self.stride[0] * self.stride[1]))

    def channel_view(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over x or the layer's output."""
        return v.reshape(1, -1, 1, 1) if self.is_conv else v.reshape(-1)


def alpha_scale(alpha: Optional[float], rank: int) -> float:
    """g = alpha / rank; a missing alpha means g = 1, as every reader does."""
    if alpha is None:
        return 1.0
    return float(alpha) / rank


def storable_alpha(alpha: float) -> float:
    """Round alpha to the nearest value that bf16 (and so fp16 and fp32) store exactly.

    Files are often saved in fp16/bf16; readers compute g from the stored alpha. Rounding once,
    at creation, makes the g used in training equal to the g every reader computes.
    """
    return float(torch.tensor(float(alpha), dtype=torch.bfloat16).float())


def kaiming(t: torch.Tensor) -> torch.Tensor:
    """kaiming_uniform(a=sqrt(5)) as torch Linear and kohya's LoRA initialise lora_down."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
