"""The algorithms, by name: each an object owning its layout and math (``algorithm.py``)."""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from .adapter import Adapter
from .algorithm import Algorithm
from .geometry import LayerGeometry
from .locon import LOCON
from .loha import LOHA
from .lokr import LOKR

ALGORITHMS: Dict[str, Algorithm] = {a.name: a for a in (LOCON, LOHA, LOKR)}

ALPHA = "alpha"
DORA_SCALE = "dora_scale"


def detect(name: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """Which algorithm a module's stored tensors belong to, from their suffixes alone."""
    suffixes = set(tensors) - {ALPHA, DORA_SCALE}
    for algo in ALGORITHMS.values():
        if algo.owns(suffixes):
            return algo.name
    raise ValueError(f"{name}: unrecognised tensors {sorted(suffixes)}; known: "
                     + "; ".join(f"{a.name}: {', '.join(a.suffixes)}" for a in ALGORITHMS.values()))


__all__ = ["ALGORITHMS", "ALPHA", "Adapter", "Algorithm", "DORA_SCALE", "LayerGeometry", "detect"]
