"""Dense weight differences -> LoCon tensors: truncated SVD (or Tucker/HOSVD for kxk convs), with
the rank fixed, chosen from the spectrum (sd-scripts' resize_lora rules), or exact (every singular
value above fp32 noise). The error is measured on the tensors as they will be stored.

A difference that is exactly zero (a module the training never changed: sd-scripts' SDXL text
encoder 1 never uses its last layer, so that layer's lora_up stays zero) has no singular vectors to
keep; it is written as a rank-1 LoCon with lora_up = 0 and a unit lora_down (g*dW = 0 exactly, every
tensor finite, and training can resume from it: the zero lora_up still gets a gradient)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..algos import locon

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def _gram_left(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, s) of an fp64 matrix from the eigendecomposition of the Gram matrix of its smaller side."""
    if m.shape[0] <= m.shape[1]:
        evals, evecs = torch.linalg.eigh(m @ m.T)
        return evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()
    evals, evecs = torch.linalg.eigh(m.T @ m)  # tall: right vectors, then U = M V / s
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    return (m @ evecs) / s.clamp_min(torch.finfo(torch.float64).tiny), s


def left_spectrum(m: torch.Tensor, rank_bound: Optional[int] = None, seed: int = 0, power: int = 0
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, s): left singular vectors (fp64) and singular values (descending) of the matrix ``m``.

    From the eigendecomposition of the fp64 Gram matrix of the smaller side: much faster on CPUs
    than a full SVD (a 1280 x 11520 conv: seconds instead of half a minute), and accurate to
    ~1e-8 * s_max, far below the fp32 noise level choose_rank keeps. With ``rank_bound`` (a known
    upper bound of the rank, e.g. r*r for LoHa) the column space is first found from ``m`` times a
    random [n, bound + 8] matrix (exact up to fp32 rounding, since the rank is at most the bound),
    so only a (bound + 8)-sized problem is decomposed. With ``power`` > 0 the bound is a sketch size
    instead (randomized SVD with that many power iterations: approximate top singular vectors of a
    matrix of any rank; the caller measures the resulting error)."""
    rows, cols = m.shape
    if rank_bound is not None and rank_bound + 8 < min(rows, cols):
        g = torch.Generator().manual_seed(seed)
        m32 = m.float()
        basis, _ = torch.linalg.qr((m32 @ torch.randn(cols, rank_bound + 8, generator=g)).double())
        for _ in range(power):
            basis, _ = torch.linalg.qr((m32 @ (m32.T @ basis.float())).double())
        u, s = _gram_left((basis.T.float() @ m32).double())
        return basis @ u, s
    return _gram_left(m.double())


@dataclass
class Fit:
    tensors: Dict[str, torch.Tensor]  # lora_down/up(/mid).weight and alpha
    rank: int
    error: float  # ||D - D_fit||_F, measured on the stored (rounded) tensors
    norm: float  # ||D||_F
    numerical_rank: Optional[int] = None  # singular values above fp32 noise (0: D is zero)

    @property
    def zero(self) -> bool:
        return self.norm == 0.0

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def check_dynamic(method: Optional[str], value: Optional[float]) -> None:
    if method is None:
        return
    if method not in DYNAMIC:
        raise ValueError(f"--dynamic {method!r}: expected one of {', '.join(DYNAMIC)}")
    if value is None:
        raise ValueError(f"--dynamic {method} needs a value")
    if method == "sv_ratio" and not value >= 1:
        raise ValueError(f"--dynamic sv_ratio {value:g}: the ratio s_max/s_min kept must be >= 1")
    if method in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise ValueError(f"--dynamic {method} {value:g}: a fraction in (0, 1] is expected")


def choose_rank(s: torch.Tensor, rank: Optional[int], dynamic: Optional[Tuple[str, float]] = None) -> int:
    """How many singular values (descending ``s``) to keep: at most ``rank`` (None: all above fp32
    noise), fewer if the dynamic rule says so; at least 1."""
    s = s.double()
    n = s.numel()
    if n == 0 or float(s[0]) == 0.0:
        return 1
    noise = float(s[0]) * n * torch.finfo(torch.float32).eps
    k = int((s > noise).sum())
    if dynamic is not None:
        method, x = dynamic
        if method == "sv_ratio":
            k = min(k, int((s >= s[0] / x).sum()))
        elif method == "sv_cumulative":
            c = torch.cumsum(s, 0) / s.sum()
            k = min(k, int((c < x - 1e-12).sum()) + 1)
        elif method == "sv_fro":
            c = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
            k = min(k, int((c < x - 1e-12).sum()) + 1)
    if rank is not None:
        k = min(k, rank)
    return max(1, k)


def numerical_rank(s: torch.Tensor) -> int:
    """How many singular values (descending) are above fp32 noise (0 for a zero matrix)."""
    s = s.double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > float(s[0]) * s.numel() * torch.finfo(torch.float32).eps).sum())


def zero_fit(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Fit:
    """A rank-1 LoCon whose g*dW is exactly zero: lora_up = 0, lora_down a unit vector, alpha = 1
    (see the module docstring)."""
    shape = tuple(int(x) for x in shape)
    down = torch.zeros(1, *shape[1:])
    down.view(-1)[0] = 1.0
    up = torch.zeros(shape[0], 1, *([1, 1] if len(shape) == 4 else []))
    tensors = {locon.DOWN: down.to(dtype), locon.UP: up.to(dtype), "alpha": torch.tensor(1.0, dtype=dtype)}
    return Fit(tensors, 1, 0.0, 0.0, 0)


def _measure(d: torch.Tensor, tensors: Dict[str, torch.Tensor]) -> float:
    approx = locon.LOCON.delta({k: v.float() for k, v in tensors.items() if k != "alpha"}, tuple(d.shape))
    return float(torch.linalg.vector_norm(d.float() - approx, dtype=torch.float64))


def svd_fit(d: torch.Tensor, rank: Optional[int], dynamic: Optional[Tuple[str, float]] = None,
            dtype: torch.dtype = torch.float32, rank_bound: Optional[int] = None, power: int = 0) -> Fit:
    """LoCon (up, down, alpha = rank: g = 1) approximating the weight-shaped ``d`` by truncated SVD
    of its [out, in*kh*kw] flattening: the projection on its top-r left singular vectors, which is
    the truncated SVD; factors balanced (each gets sqrt of the singular values)."""
    d = d.float()
    shape = tuple(d.shape)
    if not bool(d.any()):
        return zero_fit(shape, dtype)
    m = d.reshape(shape[0], -1)
    u, s = left_spectrum(m, rank_bound, power=power)
    r = choose_rank(s, rank, dynamic)
    # kept singular values are above fp32 noise (choose_rank), so > 0; the division is done in fp64,
    # where sqrt(s) of any fp32 matrix's s is far from underflowing
    root = s[:r].sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    up = (u[:, :r] * root).float()
    down = ((u[:, :r].T @ m.double()) / root[:, None]).float()
    if len(shape) == 4:
        up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    tensors = {locon.DOWN: down.to(dtype).contiguous(), locon.UP: up.to(dtype).contiguous(),
               "alpha": torch.tensor(float(r), dtype=dtype)}
    return Fit(tensors, r, _measure(d, tensors), float(torch.linalg.vector_norm(d, dtype=torch.float64)),
               None if power else numerical_rank(s))


def tucker_fit(d: torch.Tensor, rank: Optional[int], dynamic: Optional[Tuple[str, float]] = None,
               dtype: torch.dtype = torch.float32, rank_bound: Optional[int] = None) -> Fit:
    """Tucker LoCon (lora_down [r,in,1,1], lora_mid [r,r,kh,kw], lora_up [out,r,1,1]) of a kxk
    conv's ``d`` by truncated HOSVD on the output and input modes (zero-padded to one rank)."""
    d = d.float()
    o, i, kh, kw = d.shape
    if not bool(d.any()):
        return zero_fit(d.shape, dtype)
    u1, s1 = left_spectrum(d.reshape(o, -1), rank_bound)
    u2, s2 = left_spectrum(d.permute(1, 0, 2, 3).reshape(i, -1), rank_bound)
    r = max(choose_rank(s1, rank, dynamic), choose_rank(s2, rank, dynamic))  # one rank for both modes
    a = torch.zeros(o, r, dtype=torch.float64)
    b = torch.zeros(i, r, dtype=torch.float64)
    a[:, :min(r, u1.shape[1])] = u1[:, :r]
    b[:, :min(r, u2.shape[1])] = u2[:, :r]
    mid = torch.einsum("oihw,oa,ib->abhw", d.double(), a, b)
    tensors = {locon.DOWN: b.T.reshape(r, i, 1, 1).to(dtype).contiguous(),
               locon.MID: mid.to(dtype).contiguous(),
               locon.UP: a.reshape(o, r, 1, 1).to(dtype).contiguous(),
               "alpha": torch.tensor(float(r), dtype=dtype)}
    return Fit(tensors, r, _measure(d, tensors), float(torch.linalg.vector_norm(d, dtype=torch.float64)),
               max(numerical_rank(s1), numerical_rank(s2)))


def fit(d: torch.Tensor, rank: Optional[int], dynamic=None, tucker: bool = False, dtype=torch.float32,
        rank_bound: Optional[int] = None) -> Fit:
    if tucker and d.dim() == 4 and tuple(d.shape[2:]) != (1, 1):
        return tucker_fit(d, rank, dynamic, dtype, rank_bound)
    return svd_fit(d, rank, dynamic, dtype, rank_bound)


def fold_tucker(tensors: Dict[str, torch.Tensor], shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A Tucker LoCon's ``lora_mid`` folded into a plain ``lora_down`` [r, in, kh, kw] (exact: the
    LoCon delta with an identity ``lora_up`` is exactly mid x down)."""
    if locon.MID not in tensors:
        return dict(tensors)
    r = tensors[locon.DOWN].shape[0]
    eye = torch.eye(r, dtype=torch.float32).reshape(r, r, 1, 1)
    t = {locon.UP: eye, locon.MID: tensors[locon.MID].float(), locon.DOWN: tensors[locon.DOWN].float()}
    down = locon.LOCON.delta(t, (r, shape[1], *shape[2:]))
    out = {k: v for k, v in tensors.items() if k not in (locon.MID, locon.DOWN)}
    out[locon.DOWN] = down.to(tensors[locon.DOWN].dtype)
    return out
