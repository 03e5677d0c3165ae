"""The adapter contract: one adapter wraps one Linear or Conv2d layer.

An algorithm is two things kept side by side in its own file:
  * its *math*: pure functions from the stored tensors (named exactly as in the file, e.g.
    ``lora_down.weight``) to the dense delta ``dW`` and to the layout facts (rank, Tucker, ...).
    These functions are the single definition used by the training forward (where it needs a
    dense delta), ``merge_to``, max-norm, the loader and the tests.
  * an ``Adapter`` subclass that owns the trainable tensors and chooses a fast forward.

Nothing here knows about kohya, files or key names beyond the tensor suffixes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dora as dora_math


@dataclass(frozen=True)
class LayerGeometry:
    """What an adapter needs to know about the layer it wraps."""

    out_dim: int
    in_dim: int
    kernel: Tuple[int, ...] = ()  # () for Linear, (kh, kw) for Conv2d
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] | str = ()
    dilation: Tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return len(self.kernel) > 0

    @property
    def is_kxk(self) -> bool:
        return self.is_conv and tuple(self.kernel) != (1, 1)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_dim, self.in_dim, *self.kernel)

    @staticmethod
    def of(layer: nn.Module) -> "LayerGeometry":
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("grouped convolutions are not supported")
            return LayerGeometry(
                layer.out_channels, layer.in_channels, tuple(layer.kernel_size),
                tuple(layer.stride), layer.padding, tuple(layer.dilation),
            )
        if isinstance(layer, nn.Linear):
            return LayerGeometry(layer.out_features, layer.in_features)
        raise TypeError(f"cannot adapt a {type(layer).__name__}; only Linear and Conv2d")

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's own op with another weight (same stride/padding/dilation)."""
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, weight, bias)


def alpha_scale(alpha: Optional[float], rank: int) -> float:
    """g = alpha / rank; a missing alpha means g = 1, as every reader does."""
    if alpha is None:
        return 1.0
    return float(alpha) / rank


def storable_alpha(alpha: float) -> float:
    """Round alpha to the nearest value that bf16 (and so fp16 and fp32) store exactly.

    Files are often saved in fp16/bf16; readers compute g from the stored alpha. Rounding once,
    at creation, makes the g used in training equal to the g every reader computes.
    """
    return float(torch.tensor(float(alpha), dtype=torch.bfloat16).float())


class Adapter(nn.Module):
    """Base class. Subclasses set ``algo``, create their parameters, and implement
    ``tensors()``, set ``delta_fn`` (their math module's ``delta``) and optionally a faster forward.

    Contract:
      * ``delta()`` = g * dW, dense, shaped like the base weight (multiplier not applied).
      * ``merged_weight(m)`` = the weight the layer behaves as at multiplier m.
      * ``forward(x)`` equals ``layer(x)`` with ``merged_weight(multiplier)`` (outside dropouts).
    """

    algo: str = ""
    #: tensor suffixes that sd-scripts' LoRA+ treats as the "up" side (lr * ratio)
    plus_suffixes: Tuple[str, ...] = ()
    #: the tensor initialised to zero so that dW starts at 0; with use_scalar a trainable scalar
    #: (starting at 0) plays that role instead and is folded into this tensor when saving
    zero_init: str = ""

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        alpha: float,
        multiplier: float = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
        dora_axis: Optional[str] = None,
        dora_detach_norm: bool = False,
        use_scalar: bool = False,
        bypass: bool = False,
    ):
        super().__init__()
        self.lora_name = name
        self.geometry = LayerGeometry.of(layer)
        self._layer = [layer]  # a list so the base layer is not registered as a submodule
        self._org_forward = None
        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self.enabled = True
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._alpha_value = float(alpha)
        self._backup: Optional[torch.Tensor] = None
        self.scalar = nn.Parameter(torch.zeros(())) if use_scalar else None
        if bypass and dora_axis is not None:
            raise ValueError("bypass mode cannot be combined with DoRA")
        self.bypass = bypass  # never fold into the base weight: base(x) + delta op (e.g. quantised bases)
        self.dora_axis = dora_axis
        self.dora_detach_norm = dora_detach_norm
        if dora_axis is not None:
            w0 = layer.weight.detach()
            self.dora_scale = nn.Parameter(dora_math.weight_norm(w0.float(), dora_axis).to(torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if prefix + "alpha" in state_dict:  # keep the cached scale in step with a loaded alpha
            self._alpha_value = float(state_dict[prefix + "alpha"])
        if self.scalar is not None and prefix + "scalar" not in state_dict:
            # files hold the scalar folded into the factors (export_tensors): it is 1 after loading
            with torch.no_grad():
                self.scalar.fill_(1.0)
            if prefix + "scalar" in missing_keys:
                missing_keys.remove(prefix + "scalar")

    # ----- the base layer -------------------------------------------------------------------
    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this adapter (kohya's hook)."""
        if self._org_forward is not None:
            return
        self._had_own_forward = "forward" in self.layer.__dict__  # e.g. another network's hook
        self._org_forward = self.layer.forward
        self.layer.forward = self.forward

    def remove(self) -> None:
        if self._org_forward is not None:
            if self._had_own_forward:
                self.layer.forward = self._org_forward
            else:
                del self.layer.forward  # back to the class method
            self._org_forward = None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._org_forward is not None:
            return self._org_forward(x)
        return self.layer.forward(x)

    # ----- math ------------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The stored tensors under their file suffixes (parameters, not copies)."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return alpha_scale(self._alpha_value, self.rank)

    #: the algorithm's math definition: delta_fn(tensors, weight_shape) -> dW
    delta_fn = None

    def delta(self, tensors: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """g * dW from the algorithm's math definition, shaped like the base weight (times the
        trainable scalar with use_scalar); ``tensors`` replaces the stored ones (e.g. masked)."""
        d = self.delta_fn(self.tensors() if tensors is None else tensors, self.geometry.weight_shape)
        d = d.reshape(self.geometry.weight_shape) * self.scale
        return d if self.scalar is None else d * self.scalar

    def delta_norm(self) -> float:
        """||g * dW||_F (no dropout, multiplier 1): what --scale_weight_norms bounds."""
        return float(self.delta().float().norm())

    def export_tensors(self) -> Dict[str, torch.Tensor]:
        """What the file holds for this module, under the file's suffixes: the factors (with the
        scalar folded in), alpha, and dora_scale."""
        t = {k: v.detach() for k, v in self.tensors().items()}
        if self.scalar is not None:
            t[self.zero_init] = t[self.zero_init] * self.scalar.detach()
        t["alpha"] = self.alpha.detach()
        if self.dora_axis is not None:
            t["dora_scale"] = self.dora_scale.detach()
        return t

    def merged_weight(self, multiplier: Optional[float] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight the layer behaves as, in fp32 (DoRA-aware)."""
        m = self.multiplier if multiplier is None else multiplier
        w0 = (self.layer.weight if base is None else base).float()
        d = self.delta().float().to(w0.device)
        if self.dora_axis is None:
            return w0 + m * d
        return dora_math.merge(w0, d, self.dora_scale.float().to(w0.device), self.dora_axis, m)

    # ----- multiplicative factors, for max-norm --------------------------------------------
    def factors(self) -> Tuple[torch.Tensor, ...]:
        """Tensors such that dW is linear in each one; scaling each by c**(1/k) scales dW by c."""
        fs = tuple(self.tensors().values())
        return fs if self.scalar is None else fs + (self.scalar,)

    @torch.no_grad()
    def rescale_delta(self, ratio: float) -> None:
        fs = self.factors()
        c = ratio ** (1.0 / len(fs))
        for f in fs:
            f.mul_(c)

    # ----- forward ---------------------------------------------------------------------------
    def _skip(self) -> bool:
        if not self.enabled:
            return True
        if self.training and self.module_dropout is not None and torch.rand(()) < self.module_dropout:
            return True
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0 or self._skip():
            return self.base_forward(x)
        if self.dora_axis is not None:
            return self.dora_forward(x)
        return self.fast_forward(x)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Default: fold W0 + m*g*dW into one op (no second full-size op). With neuron dropout in
        training, or in bypass mode, the delta runs as its own op beside the untouched base layer."""
        d = self.training_delta()
        drop = self.training and self.dropout is not None
        if not (self.bypass or drop):
            return self.merged_forward(x, d)
        delta_out = self.geometry.apply(x, (self.multiplier * d).to(x.dtype))
        if drop:
            delta_out = F.dropout(delta_out, p=self.dropout)
        return self.base_forward(x) + delta_out

    def training_delta(self) -> torch.Tensor:
        """g * dW with rank dropout applied in training (row mask on the output axis,
        rescaled by 1/(1-p)); deterministic otherwise."""
        d = self.delta()
        if self.training and self.rank_dropout is not None:
            keep = (torch.rand(d.shape[0], device=d.device) > self.rank_dropout).to(d.dtype)
            d = d * keep.view(-1, *([1] * (d.dim() - 1))) / (1.0 - self.rank_dropout)
        return d

    def merged_forward(self, x: torch.Tensor, scaled_delta: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = layer.weight
        if w.element_size() < 2:  # fp8 / quantised storage: add in the activations' dtype
            w = w.to(x.dtype)
        weight = w + (self.multiplier * scaled_delta).to(w.dtype)
        return self.geometry.apply(x, weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    def dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        w0 = self.layer.weight
        weight = dora_math.merge(
            w0.float(), self.training_delta().float(), self.dora_scale.float(), self.dora_axis,
            self.multiplier, detach_norm=self.dora_detach_norm,
        )
        bias = self.layer.bias
        return self.geometry.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    # ----- merging into the base layer (merge_to, gen_img pre_calculation) -----------------
    @torch.no_grad()
    def merge_into_layer(self, multiplier: Optional[float] = None) -> None:
        w = self.layer.weight
        w.copy_(self.merged_weight(multiplier).to(w.device, w.dtype))

    @torch.no_grad()
    def backup_weight(self) -> None:
        if self._backup is None:
            self._backup = self.layer.weight.detach().clone()

    @torch.no_grad()
    def restore_weight(self) -> None:
        if self._backup is not None:
            self.layer.weight.copy_(self._backup)
        self.enabled = True

    def extra_repr(self) -> str:
        return f"{self.lora_name}, algo={self.algo}, rank={self.rank}, alpha={self._alpha_value:g}"


def kaiming(t: torch.Tensor) -> torch.Tensor:
    """kaiming_uniform(a=sqrt(5)) as torch Linear and kohya's LoRA initialise lora_down."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
