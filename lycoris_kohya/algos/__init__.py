"""The algorithms, by name. Each entry pairs an Adapter class with its math module (``SUFFIXES``,
``delta``, ``layout``, ``apply``, ``costs``, ``norm_sq``, ``dora_pair``, ``components``, LoKr's ``dora_kron``)."""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Mapping, Tuple, Type

import torch

from . import dora, loha, lokr, locon
from .base import Adapter, LayerGeometry
from .locon import LoConAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter

ALGORITHMS: Dict[str, Tuple[Type[Adapter], ModuleType]] = {
    "locon": (LoConAdapter, locon),
    "loha": (LoHaAdapter, loha),
    "lokr": (LoKrAdapter, lokr),
}
for _cls, _math in ALGORITHMS.values():
    _cls.math = _math

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


__all__ = ["ALGORITHMS", "Adapter", "LayerGeometry", "detect", "dora"]
