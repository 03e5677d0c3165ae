"""One adapter: an algorithm object and its trainable tensors over one Linear or Conv2d layer.

Contract:
  * ``delta()`` = g * dW, dense, shaped like the base weight (multiplier not applied);
  * ``merged_weight(m, base)`` = the weight the layer behaves as at multiplier m over ``base``;
  * ``forward(x)`` = the forward installed before this adapter (``hooks``), plus this adapter's
    effect: for the plain layer, ``layer(x)`` with ``merged_weight(multiplier)`` (outside dropouts).
    The path (one folded op, or the layer plus the factored map) is the policy's (``paths``).

Tensors are registered under the file's suffixes (``lora_down.weight`` as a submodule's ``weight``),
so the state dict keys are the file's keys. Nothing here knows about kohya, files or key names.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import foreign, paths
from .algorithm import Algorithm
from .dora import DoRA
from .fold import folded_forward
from .geometry import LayerGeometry
from .hooks import LayerHook
from .torch_ops import is_compiling, no_autocast


class _Holder(nn.Module):
    """Holds one tensor as ``.weight`` so that its key is ``lora_down.weight`` etc."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t)


class Adapter(LayerHook):
    def __init__(
        self,
        name: str,
        layer: nn.Module,
        algorithm: Algorithm,
        rank: int,
        alpha: float,
        layout=None,
        multiplier: float = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
        dora_axis: Optional[str] = None,
        dora_detach_norm: bool = False,
        use_scalar: bool = False,
        bypass: bool = False,
        forward_path: str = "auto",
        **options,
    ):
        """``layout``: the algorithm's layout (a file's); None plans one from ``rank`` and ``options``
        (use_tucker; LoKr: factor, decompose_both, full_matrix, unbalanced_factorization)."""
        super().__init__(layer)
        self.lora_name = name
        self.algorithm = algorithm
        self.algo = algorithm.name
        self.geometry = g = LayerGeometry.of(layer)
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
        # bypass: never fold into the base weight (quantised bases): base(x) + delta(x)
        self.forward_path = "structured" if bypass else paths.check(forward_path)
        self.bypass = bypass
        self.dora = DoRA(dora_axis, dora_detach_norm) if dora_axis is not None else None
        if self.dora is not None:
            # ||W0|| of the weight the layer's forward uses (dequantised for a --fp8_scaled layer)
            self.dora_scale = nn.Parameter(self.dora.magnitude(foreign.stored_weight(layer)))
        self._cost_cache: Optional[Tuple[int, int]] = None

        self.layout = layout if layout is not None else algorithm.plan(g, rank, **options)
        #: a note on the planned layout for the training log (``Algorithm.plan_note``), or None
        self.plan_note = None if layout is not None else algorithm.plan_note(self.layout, rank, options)
        if not self.layout.use_alpha:
            # g = 1 whatever alpha is (LoKr with both factors full): stored as 1, which every reader
            # takes as g = 1, whether it ignores alpha (today's), divides it by a placeholder rank 1,
            # or applies it (ComfyUI #15114)
            self.alpha.fill_(1.0)
            self._alpha_value = 1.0
        tensors, self.zero_init = algorithm.init(self.layout, g, use_scalar)
        for suffix, t in tensors.items():
            holder, _, leaf = suffix.partition(".")
            setattr(self, holder, _Holder(t) if leaf == "weight" else nn.Parameter(t))
        for suffix in algorithm.suffixes:  # a tensor this layout does not have reads as None
            if suffix not in tensors:
                setattr(self, suffix.partition(".")[0], None)
        self._names = [s for s in algorithm.suffixes if s in tensors]

    @property
    def dora_axis(self) -> Optional[str]:
        return None if self.dora is None else self.dora.axis

    @property
    def dora_detach_norm(self) -> bool:
        return self.dora is not None and self.dora.detach_norm

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

    def apply_to(self) -> None:
        super().apply_to()
        self._costs()  # outside any torch.compile trace

    # ----- tensors and math ------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The stored tensors under their file suffixes (parameters, not copies)."""
        out = {}
        for s in self._names:
            holder, _, leaf = s.partition(".")
            out[s] = getattr(getattr(self, holder), leaf) if leaf else getattr(self, holder)
        return out

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def scale(self) -> float:
        return self.algorithm.scale(self.layout, self._alpha_value)

    @property
    def plus_suffixes(self) -> Tuple[str, ...]:
        return self.algorithm.plus

    def gain(self):
        """g, times the trainable scalar with use_scalar (a tensor then)."""
        return self.scale if self.scalar is None else self.scale * self.scalar

    def delta(self, tensors: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """g * dW shaped like the base weight (times the scalar with use_scalar); ``tensors``
        replaces the stored ones (e.g. masked)."""
        d = self.algorithm.delta(self.tensors() if tensors is None else tensors, self.geometry.weight_shape)
        return d.reshape(self.geometry.weight_shape) * self.gain()

    @torch.no_grad()
    def delta_norm(self) -> float:
        """||g * dW||_F (no dropout, multiplier 1): what --scale_weight_norms bounds, from factor
        identities, without building dW."""
        t = {k: v.detach().double() for k, v in self.tensors().items()}
        sq = self.algorithm.norm_sq(t, self.geometry)
        gain = abs(self.scale * (1.0 if self.scalar is None else float(self.scalar)))
        return gain * float(sq.clamp_min(0.0)) ** 0.5

    def export_tensors(self) -> Dict[str, torch.Tensor]:
        """What the file holds for this module: the factors (the scalar folded in), alpha, dora_scale."""
        t = {k: v.detach() for k, v in self.tensors().items()}
        if self.scalar is not None:
            t[self.zero_init] = t[self.zero_init] * self.scalar.detach()
        t["alpha"] = self.alpha.detach()
        if self.dora is not None:
            t["dora_scale"] = self.dora_scale.detach()
        return t

    def merged_weight(self, multiplier: Optional[float] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight the layer behaves as over ``base`` (default: the weight below), in fp32.
        A quantised layer's stored fp8 tensor is not a weight: passed as ``base`` (merge_to,
        merge_into_layer), an error, rather than a merged weight written back into the fp8 tensor."""
        m = self.multiplier if multiplier is None else multiplier
        if base is None:
            base = self.weight_below()
            base = foreign.stored_weight(self.layer) if base is None else base
        elif foreign.is_quantised(base) and foreign.is_fp8_scaled(self.layer):
            raise foreign.cannot_merge_into_fp8_scaled([self.lora_name])
        w0 = base.float()
        with no_autocast(w0.device.type):
            d = self.delta().float().to(w0.device)
            if self.dora is None:
                return w0 + m * d
            return self.dora.merge(w0, d, self.dora_scale.float().to(w0.device), m)

    @torch.no_grad()
    def effective_weight(self) -> Optional[torch.Tensor]:
        """The weight the layer behaves as up to and including this adapter (eval, fp32)."""
        below = self.weight_below()
        if below is None or self._orphaned or not self.enabled or self.multiplier == 0:
            return below
        return self.merged_weight(base=below.detach())

    # ----- max-norm: multiplicative factors ----------------------------------------------------
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
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        m = self._live_multiplier()
        if m is None:
            return self.base_forward(x, *args, **kwargs)
        if self.dora is not None:
            return self.dora.forward(self, x, m, args, kwargs)
        t = self.tensors()
        if self.folds(x, args, kwargs):
            return self.folded(x, t, m)
        return self.base_forward(x, *args, **kwargs) + self.delta_out(x, t, m * self.gain())

    def _live_multiplier(self):
        """The multiplier of this call, or None when the adapter sits this call out (disabled,
        m = 0, or dropped by module_dropout). Under torch.compile module_dropout multiplies by a
        random 0/1 instead of branching, so the graph does not break."""
        if self._orphaned or not self.enabled or self.multiplier == 0:
            return None
        if self.training and self.module_dropout is not None:
            if is_compiling():
                return self.multiplier * (torch.rand(()) >= self.module_dropout).float()
            if torch.rand(()) < self.module_dropout:
                return None
        return self.multiplier

    def delta_out(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], gain, per_sample: bool = True) -> torch.Tensor:
        """gain * dW(x) on the structured path, with the training dropouts on the rank activation:
        neuron dropout elementwise, rank dropout one mask per sample and rank component (kohya's
        networks.lora semantics; its 1/(1-p) folded into the gain). With DoRA rank dropout acts on
        the weight instead (``per_sample=False``, see ``DoRA.tensors``)."""
        p = self.dropout if self.training else None
        q = self.rank_dropout if self.training and per_sample else None
        if p is None and q is None:
            return self.algorithm.apply(t, x, self.geometry, gain, None)
        if q is not None:
            gain = gain / (1.0 - q)

        def hidden(h: torch.Tensor, dim: int) -> torch.Tensor:
            if p is not None:
                h = F.dropout(h, p=p)
            if q is not None:
                shape = [1] * h.dim()
                shape[0], shape[dim] = h.shape[0], h.shape[dim]
                h = h * (torch.rand(shape, device=h.device) > q).to(h.dtype)
            return h

        return self.algorithm.apply(t, x, self.geometry, gain, hidden)

    # ----- the folded path -------------------------------------------------------------------
    def grad_wanted(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def folds(self, x: torch.Tensor, args, kwargs, dora: bool = False) -> bool:
        """Whether this call folds (see ``paths``)."""
        if args or kwargs or not self._plain or self.forward_path == "structured":
            return False
        if self.training and (self.dropout is not None or (self.rank_dropout is not None and not dora)):
            return False
        if self.forward_path == "fold":
            return True
        per, build = self._costs()
        return paths.fold_is_cheaper(self.geometry, per, build, self.geometry.positions(x), dora, self.grad_wanted())

    def _costs(self) -> Tuple[int, int]:
        """The cost model's inputs, from shapes only (computed once)."""
        if self._cost_cache is None:
            self._cost_cache = self.algorithm.costs(self.tensors(), self.geometry)
        return self._cost_cache

    def folded(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], m) -> torch.Tensor:
        """One op with the merged weight W0 + m*g*dW (DoRA: W0 + m*(W_d - W0)), computed in fp32
        and stored as the base is. In training, backward rebuilds it instead of storing it."""
        layer, g = self.layer, self.geometry
        w0, bias = layer.weight, layer.bias
        names = list(t)
        n = len(names)
        params = list(t.values())
        if self.scalar is not None:
            params.append(self.scalar)
        if self.dora is not None:
            params.append(self.dora_scale)
        has_scalar, dora, scale, algorithm = self.scalar is not None, self.dora, self.scale, self.algorithm
        out_dtype = w0.dtype if w0.element_size() >= 2 else x.dtype  # fp8 bases: the activations' dtype

        def weight_fn(*ps: torch.Tensor) -> torch.Tensor:
            gain = scale * ps[n] if has_scalar else scale
            d = gain * algorithm.delta(dict(zip(names, ps[:n])), g.weight_shape).reshape(g.weight_shape).float()
            if dora is None:
                return (w0.float() + m * d).to(out_dtype)
            return dora.merge(w0.float(), d, ps[-1].float(), m, detach_norm=dora.detach_norm).to(out_dtype)

        return folded_forward(x, bias, g, weight_fn, params, self.grad_wanted())

    # ----- merging into the base layer (merge_to, gen_img pre_calculation) -----------------
    @torch.no_grad()
    def merge_into_layer(self, multiplier: Optional[float] = None) -> None:
        w = self.layer.weight
        w.copy_(self.merged_weight(multiplier, base=w).to(w.device, w.dtype))

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
