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

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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
        r2 = t[W2B].shape[0]
        want = {W1A: (r, g.out_dim), W2A: (r2, g.out_dim), W1B: (r, g.in_dim), W2B: (r2, g.in_dim),
                T1: (r, r, *g.kernel), T2: (r2, r2, *g.kernel)}
    else:
        flat_in = g.in_dim * g.kernel_area
        r2 = t[W2B].shape[0]
        want = {W1A: (g.out_dim, r), W2A: (g.out_dim, r2), W1B: (r, flat_in), W2B: (r2, flat_in)}
    for k, shape in want.items():
        if tuple(t[k].shape) != shape:
            raise ValueError(f"{k} has shape {list(t[k].shape)}, the layer needs {list(shape)}")
    return {"rank": r, "use_tucker": tucker}


# ----- structured forms of the same map (tested against delta()) ------------------------------
def components(t: Mapping[str, torch.Tensor]) -> Tuple[str, int]:
    """(tensor, dim): the rank components are its slices along dim."""
    return W2B, 0


def khatri_rao(t: Mapping[str, torch.Tensor], dtype=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(KA, KB, core), KA [R, out] and KB [R, in*k] (non-Tucker) or [R, in] (Tucker), R = r1*r2, row
    i*r2+j from component i of the first half and j of the second: dW = KA^T @ KB (flattened) or, with
    Tucker, the CP form with the Kronecker core [R, R, kh, kw]. Both are built with the long axis
    innermost: an [out, r1, r2] layout, or strided reads of the stored [out, r] factors, ran the
    elementwise passes 8 wide and cost several times more (build and backward)."""
    a1, b1, a2, b2 = (t[k] if dtype is None else t[k].to(dtype) for k in (W1A, W1B, W2A, W2B))
    tucker = T1 in t
    if not tucker:  # stored [out, r]; a contiguous [r, out] copy makes the product's loops long
        a1, a2 = a1.T.contiguous(), a2.T.contiguous()
    ka = (a1[:, None, :] * a2[None, :, :]).flatten(0, 1)
    kb = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
    if not tucker:
        return ka, kb, None
    t1, t2 = (t[k] if dtype is None else t[k].to(dtype) for k in (T1, T2))
    r1, r2 = t1.shape[0], t2.shape[0]
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r1 * r2, r1 * r2, *t1.shape[2:])
    return ka, kb, core


def apply(t: Mapping[str, torch.Tensor], x: torch.Tensor, g: LayerGeometry, out_scale,
          hidden: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None) -> torch.Tensor:
    """out_scale * dW(x) as a rank-r1*r2 path (or, for a Linear on few tokens, factor by factor),
    without building dW. ``hidden(h, dim)`` sees the rank activation viewed with the components (rows
    of hada_w2_b) along ``dim``."""
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


def _apply_few_tokens(t: Mapping[str, torch.Tensor], x: torch.Tensor, out_scale,
                      hidden: Optional[Callable[[torch.Tensor, int], torch.Tensor]]) -> torch.Tensor:
    """apply() for a Linear called on at most r2 tokens, without the Khatri-Rao factors:
    dW x = sum_i A1[:, i] * (A2 @ ((B1[i] * x) @ B2^T)). Its temporaries are [tokens, r1, in or out]
    rather than [r1*r2, in or out]: 2-8x less memory traffic at the 1-4 tokens per 1280-wide layer
    of SD's inner blocks at small latents."""
    dt = x.dtype
    a1, b1, a2, b2 = (t[k].to(dt) for k in (W1A, W1B, W2A, W2B))
    h = (x.unsqueeze(-2) * b1) @ b2.T  # [..., r1, r2]: components (rows of hada_w2_b) last
    if hidden is not None:
        h = hidden(h, h.dim() - 1)
    return ((h @ a2.T) * (a1 * out_scale).T).sum(-2)


def costs(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> Tuple[int, int]:
    """(multiply-adds per output position of apply(), multiply-adds to build dW densely)."""
    r1, r2, k = t[W1B].shape[0], t[W2B].shape[0], g.kernel_area
    big = r1 * r2
    if T1 in t:
        per = big * g.in_dim + big * big * k + big * g.out_dim
        build = 2 * (r1 * r1 * k * g.in_dim + g.out_dim * r1 * g.in_dim * k) + g.out_dim * g.in_dim * k
    else:
        per = big * g.in_dim * k + big * g.out_dim
        build = (r1 + r2) * g.out_dim * g.in_dim * k + g.out_dim * g.in_dim * k
    return per, build


def norm_sq(t: Mapping[str, torch.Tensor], g: LayerGeometry) -> torch.Tensor:
    """||dW||_F^2 from R x R Gram matrices of the Khatri-Rao factors (R = r1*r2), never building dW:
    sum((KA KA^T) * (KB KB^T)); with Tucker, per kernel position sum(((KA KA^T) C_hw) * (C_hw (KB KB^T)))."""
    ka, kb, core = khatri_rao(t)
    if core is None:
        return ((ka @ ka.T) * (kb @ kb.T)).sum()
    c = core.permute(2, 3, 0, 1)  # [kh, kw, R, R]
    return (((ka @ ka.T) @ c) * (c @ (kb @ kb.T))).sum()


def dora_pair(t: Mapping[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(P, Q) with dW = P^T Q on the flattened [out, in*k] weight, in fp32, for DoRA's norms from
    factor identities (``dora.pair_scale``): the Khatri-Rao factors (KA, KB), of rank r1*r2. Their
    product with W0 is one matmul of rank r1*r2, several times cheaper than forming dW and its
    elementwise passes. None for Tucker."""
    if T1 in t:
        return None
    ka, kb, _ = khatri_rao({k: v.float() for k, v in t.items()})
    return ka, kb


# ----- the trainable adapter -----------------------------------------------------------------
class LoHaAdapter(Adapter):
    algo = "loha"
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
            a_shape, b_shape = (g.out_dim, rank), (rank, g.in_dim * g.kernel_area)
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
