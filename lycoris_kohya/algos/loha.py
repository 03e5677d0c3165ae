"""LoHa: the Hadamard product of two low-rank products.

    dW = (w1a @ w1b) * (w2a @ w2b)           reshaped to the base weight; r = hada_w1_b.shape[0]

Stored tensors:
  Linear / Conv     hada_w1_a, hada_w2_a [out, r]     hada_w1_b, hada_w2_b [r, in*kh*kw]
  Conv (Tucker)     hada_w1_a, hada_w2_a [r, out]     hada_w1_b, hada_w2_b [r, in]
                    hada_t1, hada_t2 [r, r, kh, kw]   W_i[o,c,h,w] = sum_pq t_i[p,q,h,w] a_i[p,o] b_i[q,c]

Structured form: (A1 B1) * (A2 B2) = KA^T @ KB with KA[i*r2+j, :] = A1[:, i] * A2[:, j] and
KB[i*r2+j, :] = B1[i, :] * B2[j, :] (row-wise Khatri-Rao products), a low-rank map of rank r1*r2.
With Tucker the same holds mode by mode: the core is the Kronecker product of t1 and t2.
Rank components (what rank_dropout drops): the rows of ``hada_w2_b`` (index j above).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, Hidden, Layout, LowRank, Shape, Tensors
from .geometry import LayerGeometry

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"


def _half(a: torch.Tensor, b: torch.Tensor, t, weight_shape: Sequence[int]) -> torch.Tensor:
    if t is None:
        return (a @ b).reshape(weight_shape)
    return torch.einsum("pqhw,po,qc->ochw", t, a, b)


def khatri_rao(t: Tensors, dtype=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(KA, KB, core), KA [R, out] and KB [R, in*k] (non-Tucker) or [R, in] (Tucker), R = r1*r2, row
    i*r2+j from component i of the first half and j of the second: dW = KA^T @ KB (flattened) or, with
    Tucker, the CP form with the Kronecker core [R, R, kh, kw]. Built with the long axis innermost."""
    a1, b1, a2, b2 = (t[k] if dtype is None else t[k].to(dtype) for k in (W1A, W1B, W2A, W2B))
    tucker = T1 in t
    if not tucker:  # stored [out, r]
        a1, a2 = a1.T.contiguous(), a2.T.contiguous()
    ka = (a1[:, None, :] * a2[None, :, :]).flatten(0, 1)
    kb = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
    if not tucker:
        return ka, kb, None
    t1, t2 = (t[k] if dtype is None else t[k].to(dtype) for k in (T1, T2))
    r1, r2 = t1.shape[0], t2.shape[0]
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r1 * r2, r1 * r2, *t1.shape[2:])
    return ka, kb, core


class LoHa(Algorithm):
    name = "loha"
    suffixes = (W1A, W1B, W2A, W2B, T1, T2)
    plus = (W1A, W2A)

    # ----- layout (plan: the Algorithm default) ---------------------------------------------
    def init(self, layout: Layout, g: LayerGeometry, use_scalar: bool) -> Tuple[Dict[str, torch.Tensor], str]:
        """LyCORIS' initialisation: hada_w2_a starts at zero (or the scalar does)."""
        r = layout.rank
        t: Dict[str, torch.Tensor] = {}
        if layout.tucker:
            a_shape, b_shape = (r, g.out_dim), (r, g.in_dim)
            t[T1] = torch.randn(r, r, *g.kernel) * 0.1
            t[T2] = torch.randn(r, r, *g.kernel) * 0.1
        else:
            a_shape, b_shape = (g.out_dim, r), (r, g.in_dim * g.kernel_area)
        t[W1A] = torch.randn(a_shape) * 0.1
        t[W1B] = torch.randn(b_shape)
        t[W2A] = torch.randn(a_shape) * 0.1 if use_scalar else torch.zeros(a_shape)
        t[W2B] = torch.randn(b_shape)
        return t, W2A

    def layout(self, t: Tensors, g: LayerGeometry) -> Layout:
        missing = [s for s in (W1A, W1B, W2A, W2B) if s not in t]
        if missing:
            raise ValueError(f"LoHa needs {', '.join(missing)}")
        if (T1 in t) != (T2 in t):
            raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2")
        r, r2 = t[W1B].shape[0], t[W2B].shape[0]
        tucker = T1 in t
        if tucker:
            if not g.is_kxk:
                raise ValueError("hada_t1/hada_t2 (Tucker) only fit kxk convolutions")
            want = {W1A: (r, g.out_dim), W2A: (r2, g.out_dim), W1B: (r, g.in_dim), W2B: (r2, g.in_dim),
                    T1: (r, r, *g.kernel), T2: (r2, r2, *g.kernel)}
        else:
            flat_in = g.in_dim * g.kernel_area
            want = {W1A: (g.out_dim, r), W2A: (g.out_dim, r2), W1B: (r, flat_in), W2B: (r2, flat_in)}
        for k, shape in want.items():
            if tuple(t[k].shape) != shape:
                raise ValueError(f"{k} has shape {list(t[k].shape)}, the layer needs {list(shape)}")
        return Layout(r, tucker)

    def flat_shape(self, t: Tensors) -> Tuple[int, int]:
        if T1 in t:
            return t[W1A].shape[1], t[W1B].shape[1] * math.prod(t[T1].shape[2:])
        return t[W1A].shape[0], t[W1B].shape[1]

    def weight_shape(self, t: Tensors) -> Optional[Shape]:
        """Only Tucker modules tell the kernel: plain ones store [out, r] and [r, in*kh*kw]."""
        if T1 in t:
            return (t[W1A].shape[1], t[W1B].shape[1], *t[T1].shape[2:])
        return None

    def rank_bound(self, t: Tensors) -> int:
        """The rank of a Hadamard product is at most the product of the ranks."""
        return t[W1B].shape[0] * t[W2B].shape[0]

    # ----- math ------------------------------------------------------------------------------
    def delta(self, t: Tensors, weight_shape: Sequence[int]) -> torch.Tensor:
        return _half(t[W1A], t[W1B], t.get(T1), weight_shape) * _half(t[W2A], t[W2B], t.get(T2), weight_shape)

    def apply(self, t: Tensors, x: torch.Tensor, g: LayerGeometry, out_scale, hidden: Hidden = None) -> torch.Tensor:
        """out_scale * dW(x) as a rank-r1*r2 path (or, for a Linear on few tokens, factor by factor);
        ``hidden`` sees the rank activation with the components (rows of hada_w2_b) along its dim."""
        r1, r2 = t[W1B].shape[0], t[W2B].shape[0]
        if not g.is_conv and x.numel() <= r2 * g.in_dim:
            return _apply_few_tokens(t, x, out_scale, hidden)
        # out_scale goes on hada_w1_a ([out, r]), not on KA ([r1*r2, out]): r2 times less to scale
        ka, kb, core = khatri_rao({**t, W1A: t[W1A] * out_scale}, x.dtype)
        if not g.is_conv:
            h = F.linear(x, kb)
            if hidden is not None:
                h = hidden(h.unflatten(-1, (r1, r2)), h.dim()).flatten(-2)
            return h @ ka
        if core is None:
            h = F.conv2d(x, kb.reshape(r1 * r2, g.in_dim, *g.kernel), None, g.stride, g.padding, g.dilation)
            if hidden is not None:
                h = hidden(h.unflatten(1, (r1, r2)), 2).flatten(1, 2)
            return F.conv2d(h, ka.T[:, :, None, None])
        h = F.conv2d(x, kb[:, :, None, None])  # channels (q1, q2): q2 indexes the rows of hada_w2_b
        if hidden is not None:
            h = hidden(h.unflatten(1, (r1, r2)), 2).flatten(1, 2)
        h = F.conv2d(h, core, None, g.stride, g.padding, g.dilation)
        return F.conv2d(h, ka.T[:, :, None, None])

    def norm_sq(self, t: Tensors, g: LayerGeometry) -> torch.Tensor:
        """sum((KA KA^T) * (KB KB^T)); with Tucker, per kernel position sum(((KA KA^T) C_hw) * (C_hw (KB KB^T)))."""
        ka, kb, core = khatri_rao(t)
        if core is None:
            return ((ka @ ka.T) * (kb @ kb.T)).sum()
        c = core.permute(2, 3, 0, 1)  # [kh, kw, R, R]
        return (((ka @ ka.T) @ c) * (c @ (kb @ kb.T))).sum()

    def factored(self, t: Tensors, g: LayerGeometry) -> Optional[LowRank]:
        """The Khatri-Rao factors (rank r1*r2); None for Tucker."""
        if T1 in t:
            return None
        ka, kb, _ = khatri_rao({k: v.float() for k, v in t.items()})
        return LowRank(ka, kb)

    def components(self, t: Tensors) -> Tuple[str, int]:
        return W2B, 0

    def costs(self, t: Tensors, g: LayerGeometry) -> Tuple[int, int]:
        r1, r2, k = t[W1B].shape[0], t[W2B].shape[0], g.kernel_area
        big = r1 * r2
        if T1 in t:
            per = big * g.in_dim + big * big * k + big * g.out_dim
            build = 2 * (r1 * r1 * k * g.in_dim + g.out_dim * r1 * g.in_dim * k) + g.out_dim * g.in_dim * k
        else:
            per = big * g.in_dim * k + big * g.out_dim
            build = (r1 + r2) * g.out_dim * g.in_dim * k + g.out_dim * g.in_dim * k
        return per, build


def _apply_few_tokens(t: Tensors, x: torch.Tensor, out_scale, hidden: Hidden) -> torch.Tensor:
    """apply() for a Linear called on at most r2 tokens, without the Khatri-Rao factors:
    dW x = sum_i A1[:, i] * (A2 @ ((B1[i] * x) @ B2^T)); temporaries [tokens, r1, in or out]."""
    dt = x.dtype
    a1, b1, a2, b2 = (t[k].to(dt) for k in (W1A, W1B, W2A, W2B))
    h = (x.unsqueeze(-2) * b1) @ b2.T  # [..., r1, r2]: components (rows of hada_w2_b) last
    if hidden is not None:
        h = hidden(h, h.dim() - 1)
    y = h @ a2.T  # under autocast in autocast's dtype, as the layer's own output
    return (y * (a1 * out_scale).T.to(y.dtype)).sum(-2)


LOHA = LoHa()
