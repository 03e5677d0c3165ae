"""Helpers over torch itself: version differences, compile and autocast state."""
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
