"""Dense weight differences -> LoCon tensors: truncated SVD (or Tucker/HOSVD for kxk convs), with
the rank fixed, chosen from the spectrum (sd-scripts' resize_lora rules), or exact (every singular
value above fp32 noise). The error is measured on the tensors as they will be stored."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..algos import locon

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class Fit:
    tensors: Dict[str, torch.Tensor]  # lora_down/up(/mid).weight and alpha
    rank: int
    error: float  # ||D - D_fit||_F, measured on the stored (rounded) tensors
    norm: float  # ||D||_F

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


def _measure(d: torch.Tensor, tensors: Dict[str, torch.Tensor]) -> float:
    approx = locon.delta({k: v.float() for k, v in tensors.items() if k != "alpha"}, tuple(d.shape))
    return float((d.double() - approx.double()).norm())


def svd_fit(d: torch.Tensor, rank: Optional[int], dynamic: Optional[Tuple[str, float]] = None,
            dtype: torch.dtype = torch.float32) -> Fit:
    """LoCon (up, down, alpha = rank: g = 1) approximating the weight-shaped ``d`` by truncated SVD
    of its [out, in*kh*kw] flattening; factors balanced (each gets sqrt of the singular values)."""
    d = d.float()
    shape = tuple(d.shape)
    m = d.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    r = choose_rank(s, rank, dynamic)
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    if len(shape) == 4:
        up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    tensors = {locon.DOWN: down.to(dtype).contiguous(), locon.UP: up.to(dtype).contiguous(),
               "alpha": torch.tensor(float(r), dtype=dtype)}
    return Fit(tensors, r, _measure(d, tensors), float(d.double().norm()))


def tucker_fit(d: torch.Tensor, rank: Optional[int], dynamic: Optional[Tuple[str, float]] = None,
               dtype: torch.dtype = torch.float32) -> Fit:
    """Tucker LoCon (lora_down [r,in,1,1], lora_mid [r,r,kh,kw], lora_up [out,r,1,1]) of a kxk
    conv's ``d`` by truncated HOSVD on the output and input modes (zero-padded to one rank)."""
    d = d.float()
    o, i, kh, kw = d.shape
    u1, s1, _ = torch.linalg.svd(d.reshape(o, -1).double(), full_matrices=False)
    u2, s2, _ = torch.linalg.svd(d.permute(1, 0, 2, 3).reshape(i, -1).double(), full_matrices=False)
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
    return Fit(tensors, r, _measure(d, tensors), float(d.double().norm()))


def fit(d: torch.Tensor, rank: Optional[int], dynamic=None, tucker: bool = False, dtype=torch.float32) -> Fit:
    if tucker and d.dim() == 4 and tuple(d.shape[2:]) != (1, 1):
        return tucker_fit(d, rank, dynamic, dtype)
    return svd_fit(d, rank, dynamic, dtype)


def fold_tucker(tensors: Dict[str, torch.Tensor], shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A Tucker LoCon's ``lora_mid`` folded into a plain ``lora_down`` [r, in, kh, kw] (exact: the
    LoCon delta with an identity ``lora_up`` is exactly mid x down)."""
    if locon.MID not in tensors:
        return dict(tensors)
    r = tensors[locon.DOWN].shape[0]
    eye = torch.eye(r, dtype=torch.float32).reshape(r, r, 1, 1)
    t = {locon.UP: eye, locon.MID: tensors[locon.MID].float(), locon.DOWN: tensors[locon.DOWN].float()}
    down = locon.delta(t, (r, shape[1], *shape[2:]))
    out = {k: v for k, v in tensors.items() if k not in (locon.MID, locon.DOWN)}
    out[locon.DOWN] = down.to(tensors[locon.DOWN].dtype)
    return out
