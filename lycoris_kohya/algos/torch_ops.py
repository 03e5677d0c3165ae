"""Helpers over torch itself: version differences, compile and autocast state, and a CPU product."""
from __future__ import annotations

from typing import Optional

import torch


def is_compiling() -> bool:
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "is_compiling"):
        return torch.compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in on this device type, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def no_autocast(device_type: str):
    """Norms and merged weights are computed in fp32, whatever autocast does around them."""
    return torch.autocast(device_type=device_type, enabled=False)


def weight_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for a few rows ``a`` [R, K] against a base weight ``w`` [K, N] (or a transposed view).
    On the CPU, MKL runs a product this skinny at about the speed of one core whatever the thread
    count; split K into one slice per thread and bmm runs the slices in parallel (SD1.5 widths, 2
    threads: 1.3-2x). Elsewhere, or when the product is not skinny, it is plain ``a @ w``."""
    if a.device.type != "cpu" or is_compiling():  # compiled code picks its own kernels
        return a @ w
    k, (rows, inner) = torch.get_num_threads(), a.shape
    if k < 2 or rows > 32 or inner % k or inner < 256 * k:
        return a @ w
    return torch.bmm(a.reshape(rows, k, inner // k).transpose(0, 1), w.reshape(k, inner // k, w.shape[1])).sum(0)
