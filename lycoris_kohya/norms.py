"""The adapters' norms as sd-scripts uses them: ``--scale_weight_norms`` (SPEC section 5) and the
norms it logs without it. The norm of a module is n = ||g*dW||_F at multiplier 1, without dropout
masks (each adapter's ``delta_norm``, from factor identities)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import weights as wio
from .algos import Adapter


def check_finite(adapters: Sequence[Adapter]) -> None:
    """Raise FloatingPointError naming every adapter tensor that holds a NaN or an Inf.

    A non-finite factor never recovers (every later output is NaN), max-norm cannot rescale it (and
    would zero a module whose norm is Inf), and save_weights refuses to write it; stopping at the
    step it appears keeps the last good file and says where training diverged."""
    named = {f"{a.lora_name}.{k}": t for a in adapters for k, t in a.named_parameters()}
    bad = wio.non_finite(named)
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" \
            if len(bad) > 1 else ""
        raise FloatingPointError(
            f"lycoris_kohya: {bad[0]} holds NaN or Inf{more}: training diverged. Files saved before "
            "this step are intact; lower the learning rate, or check --mixed_precision / --full_fp16")


def delta_norm(a: Adapter) -> float:
    """||g*dW||_F of one adapter; FloatingPointError when finite tensors overflow it."""
    n = a.delta_norm()
    if not math.isfinite(n):
        raise FloatingPointError(f"lycoris_kohya: {a.lora_name}: ||g*dW|| = {n} although its tensors are finite: "
                                 "the update overflows its dtype")
    return n


@torch.no_grad()
def max_norm(adapters: Sequence[Adapter], limit: float) -> Tuple[int, float, float]:
    """Rescale every module whose n exceeds ``limit`` to n == limit. Returns (modules rescaled, mean
    norm, max norm) over all modules after rescaling, as Python numbers."""
    limit = float(limit)
    check_finite(adapters)
    norms: List[float] = []
    keys_scaled = 0
    for a in adapters:
        n = delta_norm(a)
        if n > limit:
            a.rescale_delta(limit / n)
            n = a.delta_norm()
            keys_scaled += 1
        norms.append(n)
    if not norms:
        return 0, 0.0, 0.0
    return keys_scaled, sum(norms) / len(norms), max(norms)


@torch.no_grad()
def weight_norms(adapters: Sequence[Adapter]) -> torch.Tensor:
    """Per module n, after checking every tensor (a NaN/Inf stops training, naming it)."""
    check_finite(adapters)
    return torch.tensor([delta_norm(a) for a in adapters], dtype=torch.float32)


@torch.no_grad()
def grad_norms(adapters: Sequence[Adapter]) -> Optional[torch.Tensor]:
    """Per module, the norm of the gradient of all its trainable tensors (None: no gradients)."""
    norms = []
    for a in adapters:
        grads = [p.grad for p in a.parameters() if p.grad is not None]
        if grads:
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    return torch.stack([n.cpu() for n in norms]) if norms else None
