"""LoKr: a Kronecker product of a small and a large factor.

    out = a*b, in = c*d;   dW = kron(w1 [a,c], w2 [b,d(,kh,kw)])
    w1 = lokr_w1, or lokr_w1_a [a,r] @ lokr_w1_b [r,c]
    w2 = lokr_w2, or lokr_w2_a [b,r] @ lokr_w2_b [r,d*kh*kw] (reshaped),
         or with Tucker: W2[b,d,h,w] = sum_pq lokr_t2[p,q,h,w] lokr_w2_a[p,b] lokr_w2_b[q,d]
    r (for alpha/r) = rank of w2_b if w2 is factorised, else of w1_b; both factors full: alpha is ignored (g = 1)

Structured form (no Kronecker product built): with x viewed as X [c, d] per position,
kron(W1, W2) x = W1 X W2^T flattened row-major ([a, b] -> a*b outputs); for convs the d-channel
groups are convolved with w2 as a batch of c images, then mixed by W1.
Rank components (what rank_dropout drops): the rows of lokr_w2_b, or of lokr_w2 when it is full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, Hidden, Kron, Shape, Tensors
from .geometry import LayerGeometry, kaiming

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B, T2 = "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


def factorization(dim: int, factor: int = -1) -> Tuple[int, int]:
    """(m, n) with m*n = dim and m <= n: the most balanced split whose small side is at most
    ``factor`` (-1: no limit). A factor that divides dim is used as it is."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = math.isqrt(dim) if factor < 0 else min(math.isqrt(dim), factor)
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


@dataclass(frozen=True)
class LoKrLayout:
    a: int  # out = a*b
    b: int
    c: int  # in = c*d
    d: int
    rank: int
    w1_lowrank: bool
    w2_lowrank: bool
    tucker: bool

    @property
    def use_alpha(self) -> bool:
        return self.w1_lowrank or self.w2_lowrank

    def flags(self) -> Dict[str, bool]:
        return {"w1_lowrank": self.w1_lowrank, "w2_lowrank": self.w2_lowrank, "tucker": self.tucker}


def _w1(t: Tensors) -> torch.Tensor:
    return t[W1] if W1 in t else t[W1A] @ t[W1B]


def _w1_dims(t: Tensors) -> Tuple[int, int]:
    return tuple(t[W1].shape[:2]) if W1 in t else (t[W1A].shape[0], t[W1B].shape[1])


def _w2(t: Tensors, weight_shape: Sequence[int], b: int, d: int) -> torch.Tensor:
    if W2 in t:
        return t[W2]
    if T2 in t:
        return torch.einsum("pqhw,pb,qd->bdhw", t[T2], t[W2A], t[W2B])
    return (t[W2A] @ t[W2B]).reshape(b, d, *weight_shape[2:])


def _dims(t: Tensors, g: LayerGeometry) -> Tuple[int, int, int, int]:
    a, c = _w1_dims(t)
    return a, g.out_dim // a, c, g.in_dim // c


def _w2_dense(t: Tensors, g: LayerGeometry) -> torch.Tensor:
    _, b, _, d = _dims(t, g)
    return _w2(t, g.weight_shape, b, d).reshape(b, d, -1)


class LoKr(Algorithm):
    name = "lokr"
    suffixes = (W1, W1A, W1B, W2, W2A, W2B, T2)
    plus = (W2, W2A)  # the large factor's output side

    # ----- layout ----------------------------------------------------------------------------
    def plan(self, g: LayerGeometry, rank: int, factor: int = -1, decompose_both: bool = False,
             full_matrix: bool = False, use_tucker: bool = False, unbalanced_factorization: bool = False,
             **_) -> LoKrLayout:
        """LyCORIS' rules: w2 is low-rank unless the rank is at least half its larger side (or
        full_matrix); w1 is low-rank only with decompose_both under the same rule."""
        c, d = factorization(g.in_dim, factor)
        a, b = factorization(g.out_dim, factor)
        if unbalanced_factorization:
            a, b = b, a
        w1_lowrank = decompose_both and not full_matrix and rank < max(a, c) / 2
        w2_lowrank = not full_matrix and rank < max(b, d) / 2
        return LoKrLayout(a, b, c, d, rank, w1_lowrank, w2_lowrank, bool(use_tucker and w2_lowrank and g.is_kxk))

    def plan_note(self, layout: LoKrLayout, rank: int, options: Mapping[str, object]) -> Optional[str]:
        if not layout.w2_lowrank and rank >= max(layout.b, layout.d) / 2 and not options.get("full_matrix"):
            return (f"LoKr stores lokr_w2 as a full matrix where rank {rank} is at least half of its larger side "
                    "(LyCORIS' rule; full_matrix=True makes it explicit)")
        return None

    def init(self, layout: LoKrLayout, g: LayerGeometry, use_scalar: bool) -> Tuple[Dict[str, torch.Tensor], str]:
        """w1 random; the large factor starts at zero (its second half when low-rank) so that dW = 0."""
        lay, r, k = layout, layout.rank, tuple(g.kernel)
        t: Dict[str, torch.Tensor] = {}
        if lay.w1_lowrank:
            t[W1A] = kaiming(torch.empty(lay.a, r))
            t[W1B] = kaiming(torch.empty(r, lay.c))
        else:
            t[W1] = kaiming(torch.empty(lay.a, lay.c))
        if not lay.w2_lowrank:
            w2 = torch.empty(lay.b, lay.d, *k)
            t[W2] = kaiming(w2) if use_scalar else w2.zero_()
            return t, W2
        if lay.tucker:
            t[T2] = kaiming(torch.empty(r, r, *k))
            a_shape, b_shape = (r, lay.b), (r, lay.d)
        else:
            a_shape, b_shape = (lay.b, r), (r, lay.d * g.kernel_area)
        t[W2A] = kaiming(torch.empty(a_shape))
        w2b = torch.empty(b_shape)
        t[W2B] = kaiming(w2b) if use_scalar else w2b.zero_()
        return t, W2B

    def layout(self, t: Tensors, g: LayerGeometry) -> LoKrLayout:
        """Which factors are low-rank, Tucker, balanced or not, from shapes alone."""
        if not ((W1 in t) ^ (W1A in t and W1B in t)):
            raise ValueError("LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if not ((W2 in t) ^ (W2A in t and W2B in t)):
            raise ValueError("LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b")
        w1_lowrank, w2_lowrank, tucker = W1 not in t, W2 not in t, T2 in t
        a, c = _w1_dims(t)
        if g.out_dim % a or g.in_dim % c:
            raise ValueError(f"w1 of shape [{a}, {c}] does not divide the layer's [{g.out_dim}, {g.in_dim}]")
        b, d = g.out_dim // a, g.in_dim // c
        k = tuple(g.kernel)
        want: Dict[str, tuple] = {}
        if w1_lowrank:
            r1 = t[W1B].shape[0]
            want.update({W1A: (a, r1), W1B: (r1, c)})
        rank = t[W1B].shape[0] if w1_lowrank else 1
        if not w2_lowrank:
            want[W2] = (b, d, *k)
        else:
            rank = t[W2B].shape[0]
            if tucker:
                if not g.is_kxk:
                    raise ValueError("lokr_t2 (Tucker) only fits kxk convolutions")
                want.update({W2A: (rank, b), W2B: (rank, d), T2: (rank, rank, *k)})
            else:
                want.update({W2A: (b, rank), W2B: (rank, d * (k[0] * k[1] if k else 1))})
        for key, shape in want.items():
            if tuple(t[key].shape) != shape:
                raise ValueError(f"{key} has shape {list(t[key].shape)}, the layer needs {list(shape)}")
        return LoKrLayout(a, b, c, d, rank, w1_lowrank, w2_lowrank, tucker)

    def flat_shape(self, t: Tensors) -> Tuple[int, int]:
        a, c = _w1_dims(t)
        if W2 in t:
            w2 = t[W2]
            return a * w2.shape[0], c * w2[0].numel()
        if T2 in t:
            return a * t[W2A].shape[1], c * t[W2B].shape[1] * math.prod(t[T2].shape[2:])
        return a * t[W2A].shape[0], c * t[W2B].shape[1]

    def weight_shape(self, t: Tensors) -> Optional[Shape]:
        """Known with a full lokr_w2 or with Tucker; a factorised lokr_w2_b is stored [r, d*kh*kw]."""
        a, c = _w1_dims(t)
        if W2 in t:
            w2 = t[W2]
            return (a * w2.shape[0], c * w2.shape[1], *w2.shape[2:])
        if T2 in t:
            return (a * t[W2A].shape[1], c * t[W2B].shape[1], *t[T2].shape[2:])
        return None

    def rank_bound(self, t: Tensors) -> int:
        """rank(kron(w1, w2)) = rank(w1) * rank(w2)."""
        r1 = t[W1B].shape[0] if W1B in t else min(t[W1].shape)
        if W2B in t:
            r2 = t[W2B].shape[0]
        else:
            w2 = t[W2]
            r2 = min(w2.shape[0], w2[0].numel())
        return r1 * r2

    # ----- math ------------------------------------------------------------------------------
    def delta(self, t: Tensors, weight_shape: Sequence[int]) -> torch.Tensor:
        w1 = _w1(t)
        a, c = w1.shape
        b, d = weight_shape[0] // a, weight_shape[1] // c
        w2 = _w2(t, weight_shape, b, d)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape)

    def apply(self, t: Tensors, x: torch.Tensor, g: LayerGeometry, out_scale, hidden: Hidden = None) -> torch.Tensor:
        """out_scale * kron(w1, w2)(x) in x's dtype; ``hidden`` sees w2's output (or its rank activation)."""
        dt = x.dtype
        a, b, c, d = _dims(t, g)
        w1 = _w1(t).to(dt) * out_scale
        if not g.is_conv:
            h = x.unflatten(-1, (c, d))  # [..., c, d]
            if W2 in t:
                h = F.linear(h, t[W2].to(dt))  # [..., c, b]
                if hidden is not None:
                    h = hidden(h, h.dim() - 1)
            else:
                h = F.linear(h, t[W2B].to(dt))  # [..., c, r]
                if hidden is not None:
                    h = hidden(h, h.dim() - 1)
                h = F.linear(h, t[W2A].to(dt))
            # mix by w1 as one [a, c] x [c, N*b] product; [a, N, b] -> [..., a*b]
            lead, bb = h.shape[:-2], h.shape[-1]
            h = h.reshape(-1, c, bb)
            y = (w1 @ h.transpose(0, 1).reshape(c, -1)).reshape(a, -1, bb)
            return y.transpose(0, 1).reshape(*lead, a * bb)
        n = x.shape[0]
        h = x.reshape(n * c, d, *x.shape[2:])
        if W2 in t:
            h = F.conv2d(h, t[W2].to(dt), None, g.stride, g.padding, g.dilation)
        elif T2 in t:
            h = F.conv2d(h, t[W2B].to(dt)[:, :, None, None])
        else:
            r = t[W2B].shape[0]
            h = F.conv2d(h, t[W2B].to(dt).reshape(r, d, *g.kernel), None, g.stride, g.padding, g.dilation)
        if hidden is not None:
            h = hidden(h.unflatten(0, (n, c)), 2).flatten(0, 1)
        if T2 in t:
            h = F.conv2d(h, t[T2].to(dt), None, g.stride, g.padding, g.dilation)
            h = F.conv2d(h, t[W2A].to(dt).T[:, :, None, None])
        elif W2 not in t:
            h = F.conv2d(h, t[W2A].to(dt)[:, :, None, None])
        hw = h.shape[2:]
        y = torch.matmul(w1, h.reshape(n, c, -1))  # [n, a, b*h*w]
        return y.reshape(n, a * b, *hw)

    def norm_sq(self, t: Tensors, g: LayerGeometry) -> torch.Tensor:
        """||kron(w1, w2)||^2 = ||w1||^2 ||w2||^2 (in the dtype of t; max-norm passes fp64)."""
        return _w1(t).pow(2).sum() * _w2_dense(t, g).pow(2).sum()

    def factored(self, t: Tensors, g: LayerGeometry) -> Kron:
        """(w1 [a, c], w2 [b, d*k]) in fp32: no narrow pair exists (kron(w1, w2_a w2_b) is c*r wide)."""
        t = {k: v.float() for k, v in t.items()}
        return Kron(_w1(t), _w2_dense(t, g).flatten(1))

    def components(self, t: Tensors) -> Tuple[str, int]:
        return (W2B, 0) if W2B in t else (W2, 0)

    def costs(self, t: Tensors, g: LayerGeometry) -> Tuple[int, int]:
        a, b, c, d = _dims(t, g)
        k = g.kernel_area
        if W2 in t:
            w2_per, w2_build = b * d * k, 0
        elif T2 in t:
            r = t[W2B].shape[0]
            w2_per, w2_build = r * d + r * r * k + r * b, r * r * k * d + b * r * d * k
        else:
            r = t[W2B].shape[0]
            w2_per, w2_build = r * d * k + r * b, b * r * d * k
        return c * w2_per + a * c * b, g.out_dim * g.in_dim * k + w2_build


LOKR = LoKr()
