"""LoHa: the Hadamard product of two low-rank products.

    dW = (w1a @ w1b) * (w2a @ w2b)           reshaped to the base weight; r = hada_w1_b.shape[0]

Stored tensors:
  Linear / Conv     hada_w1_a, hada_w2_a [out, r]     hada_w1_b, hada_w2_b [r, in*kh*kw]
  Conv (Tucker)     hada_w1_a, hada_w2_a [r, out]     hada_w1_b, hada_w2_b [r, in]
                    hada_t1, hada_t2 [r, r, kh, kw]   W_i[o,c,h,w] = sum_pq t_i[p,q,h,w] a_i[p,o] b_i[q,c]
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from .base import Adapter, LayerGeometry

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"
SUFFIXES = (W1A, W1B, W2A, W2B, T1, T2)


def _half(a: torch.Tensor, b: torch.Tensor, t, weight_shape: Sequence[int]) -> torch.Tensor:
    if t is None:
        return (a @ b).reshape(weight_shape)
    return torch.einsum("pqhw,po,qc->ochw", t, a, b)


# ----- math: the one definition --------------------------------------------------------------
def delta(t: Mapping[str, torch.Tensor], weight_shape: Sequence[int]) -> torch.Tensor:
    """dW (unscaled) shaped like the base weight."""
    return _half(t[W1A], t[W1B], t.get(T1), weight_shape) * _half(t[W2A], t[W2B], t.get(T2), weight_shape)


def layout(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> Dict[str, object]:
    missing = [s for s in (W1A, W1B, W2A, W2B) if s not in t]
    if missing:
        raise ValueError(f"LoHa needs {', '.join(missing)}")
    if (T1 in t) != (T2 in t):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2")
    r = t[W1B].shape[0]
    tucker = T1 in t
    if tucker:
        if not g.is_kxk:
            raise ValueError("hada_t1/hada_t2 (Tucker) only fit kxk convolutions")
        want = {W1A: (r, g.out_dim), W2A: (r, g.out_dim), W1B: (r, g.in_dim), W2B: (r, g.in_dim),
                T1: (r, r, *g.kernel), T2: (r, r, *g.kernel)}
    else:
        flat_in = g.in_dim * (g.kernel[0] * g.kernel[1] if g.is_conv else 1)
        want = {W1A: (g.out_dim, r), W2A: (g.out_dim, r), W1B: (r, flat_in), W2B: (r, flat_in)}
    for k, shape in want.items():
        if tuple(t[k].shape) != shape:
            raise ValueError(f"{k} has shape {list(t[k].shape)}, the layer needs {list(shape)}")
    return {"rank": r, "use_tucker": tucker}


# ----- the trainable adapter -----------------------------------------------------------------
class LoHaAdapter(Adapter):
    algo = "loha"
    delta_fn = staticmethod(delta)
    plus_suffixes = (W1A, W2A)
    zero_init = W2A  # starts at zero so dW = 0; with use_scalar the scalar starts at zero instead

    def __init__(self, name: str, layer: nn.Module, rank: int, alpha: float, use_tucker: bool = False,
                 use_scalar: bool = False, **kw):
        super().__init__(name, layer, alpha, use_scalar=use_scalar, **kw)
        g = self.geometry
        self.use_tucker = bool(use_tucker and g.is_kxk)
        self._rank = rank
        if self.use_tucker:
            a_shape, b_shape = (rank, g.out_dim), (rank, g.in_dim)
            self.hada_t1 = nn.Parameter(torch.randn(rank, rank, *g.kernel) * 0.1)
            self.hada_t2 = nn.Parameter(torch.randn(rank, rank, *g.kernel) * 0.1)
        else:
            flat_in = g.in_dim * (g.kernel[0] * g.kernel[1] if g.is_conv else 1)
            a_shape, b_shape = (g.out_dim, rank), (rank, flat_in)
            self.hada_t1 = self.hada_t2 = None
        # LyCORIS' initialisation: one half starts at zero (or the scalar does)
        self.hada_w1_a = nn.Parameter(torch.randn(a_shape) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(b_shape))
        self.hada_w2_a = nn.Parameter(torch.randn(a_shape) * 0.1 if use_scalar else torch.zeros(a_shape))
        self.hada_w2_b = nn.Parameter(torch.randn(b_shape))

    @property
    def rank(self) -> int:
        return self._rank

    def tensors(self) -> Dict[str, torch.Tensor]:
        t = {W1A: self.hada_w1_a, W1B: self.hada_w1_b, W2A: self.hada_w2_a, W2B: self.hada_w2_b}
        if self.use_tucker:
            t[T1], t[T2] = self.hada_t1, self.hada_t2
        return t
