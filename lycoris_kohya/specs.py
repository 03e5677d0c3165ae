"""What a file holds, model-free: per module its algorithm, layout, rank, alpha, DoRA axis, and its
``g*dW`` or its merged weight for a given base, from the tensors' names and shapes alone, with the
one math definition of each algorithm (``algos/<algo>.py``: ``delta``, ``layout``; ``algos/dora.py``:
``merge``). The network (``create_network_from_weights``), the tools and the diffusers API read files
through here.

A module's layout is checked against the shape of the base weight it changes. That shape comes from
the model (the network), from a base checkpoint (the tools' ``--base``), or from the tensors when
they tell: always for LoCon; for LoHa and LoKr with Tucker, for LoKr with a full ``lokr_w2``, and for
any module whose ``dora_scale`` names the input dimension. A plain LoHa module, or a LoKr module with
a factorised ``lokr_w2``, stores its factors flattened to ``[out, in*kh*kw]``: whether the layer is a
Linear, a 1x1 or a kxk convolution is not in the file. Its flat ``g*dW`` (what norms and SVDs need)
is exact all the same; only writing factors that carry the kernel needs the real shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .algos import ALGORITHMS, ALPHA, DORA_SCALE, detect
from .algos import dora as dora_math
from .algos.algorithm import Layout
from .algos.geometry import LayerGeometry

Shape = Tuple[int, ...]
#: a module stored as the full weight difference itself (``<name>.diff``, shaped like the weight):
#: W = W0 + m*diff in ComfyUI and A1111; what ``convert`` writes for output-axis DoRA
DIFF = "diff"


@dataclass
class ModuleSpec:
    """Everything needed to build one adapter."""

    algo: str
    rank: int
    alpha: float
    #: what the algorithm plans a layout from (use_tucker; LoKr: factor, decompose_both, ...), and use_scalar
    options: Dict[str, object] = field(default_factory=dict)
    dora_axis: Optional[str] = None
    #: (dropout, rank_dropout, module_dropout) of this module; None: the network's
    dropouts: Optional[Tuple[Optional[float], Optional[float], Optional[float]]] = None
    #: the algorithm's layout, given (a file's); None: planned from rank and options
    layout: Optional[object] = None


class ShapeUnknown(ValueError):
    """The file alone does not say the layer's shape, and the operation needs it."""


def group_by_module(sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{"lora_unet_x.lora_down.weight": t} -> {"lora_unet_x": {"lora_down.weight": t}}."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if "." not in key:
            raise ValueError(f"key {key!r} is not '<module>.<tensor>'")
        name, suffix = key.split(".", 1)
        out.setdefault(name, {})[suffix] = t
    return out


# ----- shapes from tensors ---------------------------------------------------------------------
def flat_shape(algo: str, t: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """[out, in*kh*kw] of the layer, which every algorithm's tensors determine."""
    return ALGORITHMS[algo].flat_shape(t)


def _shape_with_dora(flat: Tuple[int, int], scale: Optional[torch.Tensor]) -> Optional[Shape]:
    """The layer's shape from [out, in*kh*kw] and a dora_scale, when it tells."""
    if scale is None:
        return None
    out, flat_in = flat
    s = tuple(scale.shape)
    if len(s) == 2:
        return (out, flat_in)  # a Linear's scale is 2-D
    if len(s) == 4 and s[0] == 1 and (s[1] != 1 or out == 1):  # input axis: [1, in, 1, 1]
        kk, rem = divmod(flat_in, s[1])
        k = math.isqrt(kk) if not rem else 0
        if k * k == kk and k > 0:
            return (out, s[1], k, k)
    return None


def shape_from_tensors(algo: str, t: Mapping[str, torch.Tensor]) -> Optional[Shape]:
    """The base weight's shape from a module's stored tensors (dora_scale included), or None
    when they do not determine it (see the module docstring)."""
    shape = ALGORITHMS[algo].weight_shape(t)
    return shape if shape is not None else _shape_with_dora(flat_shape(algo, t), t.get(DORA_SCALE))


def _dora_axis_without_shape(scale: torch.Tensor, out: int) -> str:
    s = tuple(scale.shape)
    if s[0] == out and all(x == 1 for x in s[1:]) and out != 1:
        return dora_math.OUTPUT
    return dora_math.INPUT


# ----- one module of a file --------------------------------------------------------------------
@dataclass(frozen=True)
class StoredModule:
    """One module of a file: its tensors, layout, and what it does to a base weight."""

    name: str
    algo: str
    factors: Dict[str, torch.Tensor]  # under the file's suffixes; alpha and dora_scale apart
    alpha: Optional[float]  # as stored; None: no alpha tensor (g = 1)
    rank: int
    scale: float  # g: alpha/rank, 1 without alpha or for LoKr with both factors full
    layout: Optional[Layout]  # the algorithm's layout (None for a full difference)
    dora_scale: Optional[torch.Tensor]
    dora_axis: Optional[str]
    weight_shape: Optional[Shape]  # None: not determined by the file (see the module docstring)
    flat: Tuple[int, int]  # [out, in*kh*kw]

    @property
    def tucker(self) -> bool:
        return bool(self.layout is not None and self.layout.tucker)

    @property
    def spec(self) -> ModuleSpec:
        if self.algo == DIFF:
            raise ValueError(f"{self.name}: a full weight difference ({DIFF}) is not a trainable adapter")
        alpha = self.alpha if self.alpha is not None else float(self.rank)  # every reader: g = 1
        return ModuleSpec(self.algo, self.rank, alpha, {}, self.dora_axis, layout=self.layout)

    @property
    def rank_bound(self) -> Optional[int]:
        """An upper bound of the rank of the flattened g*dW, from the layout (None for a full difference)."""
        return None if self.algo == DIFF else ALGORITHMS[self.algo].rank_bound(self.factors)

    def n_params(self) -> int:
        extra = (self.dora_scale.numel() if self.dora_scale is not None else 0) + (self.alpha is not None)
        return sum(t.numel() for t in self.factors.values()) + extra

    def dtypes(self) -> Tuple[torch.dtype, ...]:
        return tuple(sorted({t.dtype for t in self.factors.values()}, key=str))

    def fit(self, shape: Sequence[int]) -> "StoredModule":
        """This module checked against a base weight of ``shape`` (errors name the module)."""
        shape = tuple(int(s) for s in shape)
        if self.weight_shape == shape:
            return self
        t = dict(self.factors)
        if self.dora_scale is not None:
            t[DORA_SCALE] = self.dora_scale
        if self.alpha is not None:
            t[ALPHA] = torch.tensor(self.alpha)
        return read_module(self.name, t, shape)

    def _shape(self) -> Shape:
        if self.weight_shape is None:
            raise ShapeUnknown(f"{self.name}: a {self.algo} module's tensors hold the layer only as "
                               f"[{self.flat[0]}, {self.flat[1]}] (Linear or convolution is not stored); "
                               f"give the base model (--base) for its shape")
        return self.weight_shape

    def _unscaled(self, shape: Sequence[int]) -> torch.Tensor:
        if self.algo == DIFF:
            return self.factors[DIFF].float().reshape(tuple(shape))
        t = {k: v.float() for k, v in self.factors.items()}
        return ALGORITHMS[self.algo].delta(t, tuple(shape)).reshape(tuple(shape))

    def delta(self) -> torch.Tensor:
        """g * dW in fp32, shaped like the base weight."""
        return self._unscaled(self._shape()) * self.scale

    def delta_flat(self) -> torch.Tensor:
        """g * dW in fp32 as [out, in*kh*kw] (exact even when the layer's shape is unknown)."""
        return self._unscaled(self.flat) * self.scale

    def norm(self) -> float:
        """||g * dW||_F: what --scale_weight_norms bounds."""
        d = self._unscaled(self.flat)
        return abs(self.scale) * float(torch.linalg.vector_norm(d, dtype=torch.float64))

    def merged(self, base: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """The weight a layer with weight ``base`` behaves as at ``multiplier`` (fp32, DoRA-aware:
        W0 + m*g*dW, or W0 + m*(W_d - W0))."""
        mod = self.fit(base.shape)
        w0 = base.float()
        d = mod.delta().to(w0.device)
        if mod.dora_axis is None:
            return w0 + multiplier * d
        return dora_math.merge(w0, d, mod.dora_scale.float().to(w0.device), mod.dora_axis, multiplier)

    def change(self, base: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """merged(base, m) - base, in fp32: the full weight difference (exact in m: it is linear in m)."""
        return self.merged(base, multiplier) - base.float()


def read_module(name: str, tensors: Mapping[str, torch.Tensor], shape: Optional[Sequence[int]] = None) -> StoredModule:
    """A module from its stored tensors (suffix -> tensor), checked against ``shape`` when given,
    else against the shape its tensors imply. Errors name the module."""
    if DIFF in tensors:
        return _read_diff(name, tensors, shape)
    algo = detect(name, tensors)
    algorithm = ALGORITHMS[algo]
    factors = {k: v for k, v in tensors.items() if k not in (ALPHA, DORA_SCALE)}
    scale_t = tensors.get(DORA_SCALE)
    try:
        if shape is not None:
            known: Optional[Shape] = tuple(int(s) for s in shape)
        else:
            known = shape_from_tensors(algo, tensors)
        flat = (known[0], math.prod(known[1:])) if known is not None else flat_shape(algo, factors)
        geometry = LayerGeometry.of_shape(known) if known else LayerGeometry(*flat)
        layout = algorithm.layout(factors, geometry)
        axis = None
        if scale_t is not None:
            axis = (dora_math.axis_of(scale_t.shape, known) if known is not None
                    else _dora_axis_without_shape(scale_t, flat[0]))
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{name}: {e}") from None
    alpha = float(tensors[ALPHA]) if ALPHA in tensors else None
    return StoredModule(name, algo, factors, alpha, int(layout.rank), algorithm.scale(layout, alpha), layout,
                        scale_t, axis, known, flat)


def _read_diff(name: str, tensors: Mapping[str, torch.Tensor], shape: Optional[Sequence[int]]) -> StoredModule:
    extra = sorted(set(tensors) - {DIFF, ALPHA})
    if extra:
        raise ValueError(f"{name}: a {DIFF} module has no other tensors, found {extra}")
    d = tensors[DIFF]
    known = tuple(int(s) for s in shape) if shape is not None else tuple(d.shape)
    if math.prod(known) != d.numel() or known[0] != d.shape[0]:
        raise ValueError(f"{name}: {DIFF} has shape {list(d.shape)}, the layer needs {list(known)}")
    flat = (known[0], math.prod(known[1:]))
    return StoredModule(name, DIFF, {DIFF: d}, None, min(flat), 1.0, None, None, None, known, flat)


def read_modules(sd: Mapping[str, torch.Tensor], shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 require_shapes: bool = False) -> Dict[str, StoredModule]:
    """Every module of a state dict. ``shapes`` (lora name -> base weight shape) checks them
    against a model; with ``require_shapes`` a module the model lacks is an error."""
    out = {}
    for name, tensors in group_by_module(sd).items():
        shape = None if shapes is None else shapes.get(name)
        if shape is None and require_shapes:
            raise ValueError(f"the weights do not fit this model: no layer for module {name!r}")
        out[name] = read_module(name, tensors, shape)
    return out


def infer_specs(sd: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> Dict[str, ModuleSpec]:
    """A ModuleSpec per module of a state dict, checked against the model's weight shapes
    (``shapes``: lora name -> shape). Errors name the module."""
    return {n: m.spec for n, m in read_modules(sd, shapes, require_shapes=True).items()}


__all__ = ["DIFF", "ModuleSpec", "ShapeUnknown", "StoredModule", "flat_shape", "group_by_module", "infer_specs",
           "read_module", "read_modules", "shape_from_tensors"]
