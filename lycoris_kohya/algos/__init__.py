"""The algorithms, by name. Each entry pairs an Adapter class with its math module
(``SUFFIXES``, ``delta(tensors, weight_shape)``, ``layout(tensors, geometry)``)."""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Mapping, Tuple, Type

import torch

from . import dora, loha, lokr, locon
from .base import Adapter, LayerGeometry, alpha_scale
from .locon import LoConAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter

ALGORITHMS: Dict[str, Tuple[Type[Adapter], ModuleType]] = {
    "locon": (LoConAdapter, locon),
    "loha": (LoHaAdapter, loha),
    "lokr": (LoKrAdapter, lokr),
}

ALPHA = "alpha"
DORA_SCALE = "dora_scale"


def detect(name: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """Which algorithm a module's stored tensors belong to, from their suffixes alone."""
    suffixes = set(tensors) - {ALPHA, DORA_SCALE}
    for algo, (_, math) in ALGORITHMS.items():
        if suffixes and suffixes <= set(math.SUFFIXES):
            return algo
    raise ValueError(f"{name}: unrecognised tensors {sorted(suffixes)}; known: "
                     + "; ".join(f"{a}: {', '.join(m.SUFFIXES)}" for a, (_, m) in ALGORITHMS.items()))


def delta_from_tensors(algo: str, tensors: Mapping[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """g * dW for stored tensors (alpha included when present): the loader's and tools' path."""
    _, math = ALGORITHMS[algo]
    g = LayerGeometry(*weight_shape[:2], tuple(weight_shape[2:]))
    info = math.layout(tensors, g)
    alpha = tensors.get(ALPHA)
    scale = alpha_scale(None if alpha is None else float(alpha), info["rank"]) if info.get("use_alpha", True) else 1.0
    return math.delta(tensors, weight_shape) * scale


__all__ = ["ALGORITHMS", "Adapter", "LayerGeometry", "detect", "delta_from_tensors", "dora"]
