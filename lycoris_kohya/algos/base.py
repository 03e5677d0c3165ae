"""The adapter contract: one adapter wraps one Linear or Conv2d layer.

An algorithm is two things kept side by side in its own file:
  * its *math*: pure functions of the stored tensors (named exactly as in the file, e.g.
    ``lora_down.weight``):
      - ``delta(t, weight_shape)``: the dense dW, the single definition used by merges, max-norm,
        the loader, the tools and as the reference of every test;
      - ``layout(t, geometry)``: rank and options, from shapes alone;
      - ``apply(t, x, geometry, out_scale, hidden)``: the same linear map as ``delta`` applied to x
        without building dW (low-rank LoCon, Khatri-Rao LoHa, Kronecker LoKr): a second, tested
        implementation, because building dW costs as much as the layer at small latents;
      - ``costs``, ``norm_sq``, ``components``: the cost model, ||dW||^2 from factor identities, and
        which slices are the "rank components";
      - ``dora_pair`` (LoCon, LoHa: dW = P^T Q with P, Q narrow, from which ``dora.pair_scale`` takes
        DoRA's norms) or ``dora_kron`` (LoKr: dW = kron(w1, w2), for ``dora.kron_scale``);
        neither (Tucker): the norms come from a dense delta.
  * an ``Adapter`` subclass that owns the trainable tensors.

The forward of every adapter composes with whatever forward was installed on the layer before it
(another network of ours, sd-scripts' ``networks.lora``, ControlNet-LLLite...): it calls that
forward and adds its own effect. Only when nothing else hooks the layer may it fold
``W0 + m*g*dW`` into one op, and it does so only where the cost model says it is cheaper.

Nothing here knows about kohya, files or key names beyond the tensor suffixes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dora as dora_math
from .torch_ops import autocast_dtype, is_compiling, no_autocast

FORWARD_PATHS = ("auto", "fold", "structured")
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward)


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
    def kernel_area(self) -> int:
        return self.kernel[0] * self.kernel[1] if self.is_conv else 1

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_dim, self.in_dim, *self.kernel)

    @staticmethod
    def of(layer: nn.Module) -> "LayerGeometry":
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"grouped convolutions (groups={layer.groups}) are not supported")
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

    def positions(self, x: torch.Tensor) -> int:
        """How many output positions (tokens, or pixels times batch) one call computes."""
        if not self.is_conv:
            return x.numel() // self.in_dim
        n, _, h, w = x.shape
        return max(1, n * h * w // (self.stride[0] * self.stride[1]))

    def channel_view(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over x or the layer's output."""
        return v.reshape(1, -1, 1, 1) if self.is_conv else v.reshape(-1)


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


def weight_of(forward: Callable, layer: nn.Module) -> Optional[torch.Tensor]:
    """The weight a layer's forward behaves as, walking down the chain of hooks installed on it:
    the layer's own weight, plus what every adapter of ours and every sd-scripts ``networks.lora``
    module below adds (detached, fp32). None when some hook below is not a weight-space change."""
    owner, func = getattr(forward, "__self__", None), getattr(forward, "__func__", None)
    if owner is layer and func in _PLAIN_FORWARDS:
        return layer.weight.detach()
    if isinstance(owner, Adapter) and owner.layer is layer:
        return owner.effective_weight()
    down, up = getattr(owner, "lora_down", None), getattr(owner, "lora_up", None)
    if hasattr(owner, "org_forward") and hasattr(down, "weight") and hasattr(up, "weight"):
        below = weight_of(owner.org_forward, layer)  # sd-scripts' LoRAModule: org_forward + up(down(x))
        if below is None or not getattr(owner, "enabled", True):
            return below
        from .locon import DOWN, UP, delta as locon_delta

        d = locon_delta({DOWN: down.weight.detach().float(), UP: up.weight.detach().float()}, below.shape)
        return below.float() + float(owner.multiplier) * float(owner.scale) * d
    return None


class _FoldedOp(torch.autograd.Function):
    """y = op(x, weight_fn(*params)) that stores x and the small params, not the dense weight:
    backward rebuilds the weight (cheap, token-independent) instead of keeping an out x in
    tensor per layer alive between forward and backward."""

    @staticmethod
    def forward(ctx, x, bias, geometry, weight_fn, *params):
        with torch.no_grad():
            w = weight_fn(*params)
        ctx.geometry, ctx.weight_fn = geometry, weight_fn
        ctx.save_for_backward(x, bias, *params)
        return geometry.apply(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, bias, *params = ctx.saved_tensors
        g: LayerGeometry = ctx.geometry
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(p.requires_grad) for p in params]
            w = ctx.weight_fn(*ps)
        wx = w.detach().to(x.dtype)
        gx = gw = gb = None
        if g.is_conv:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, wx, None if bias is None else [bias.shape[0]], list(g.stride), list(g.padding),
                list(g.dilation), False, [0, 0], 1, [ctx.needs_input_grad[0], True, ctx.needs_input_grad[1]])
        else:
            gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[0]:
                gx = (gy2 @ wx).reshape(x.shape)
            gw = gy2.T @ x2
            if ctx.needs_input_grad[1]:
                gb = gy2.sum(0)
        wanted = [p for p in ps if p.requires_grad]
        got = iter(torch.autograd.grad(w, wanted, gw.to(w.dtype), allow_unused=True) if wanted else ())
        grads = [next(got) if p.requires_grad else None for p in ps]
        return (gx, None if gb is None else gb.to(bias.dtype), None, None, *grads)


class Adapter(nn.Module):
    """Base class. Subclasses create their parameters and implement ``tensors()`` and ``rank``;
    ``math`` is their math module (bound in ``algos/__init__.py``).

    Contract:
      * ``delta()`` = g * dW, dense, shaped like the base weight (multiplier not applied).
      * ``merged_weight(m, base)`` = the weight the layer behaves as at multiplier m over ``base``.
      * ``forward(x)`` = the forward installed before this adapter, plus this adapter's effect:
        for the plain layer, ``layer(x)`` with ``merged_weight(multiplier)`` (outside dropouts).
    """

    algo: str = ""
    math: ModuleType = None  # type: ignore[assignment]
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
        forward_path: str = "auto",
    ):
        super().__init__()
        self.lora_name = name
        self.geometry = LayerGeometry.of(layer)
        self._layer = [layer]  # a list so the base layer is not registered as a submodule
        self._org_forward: Optional[Callable] = None
        self._plain = True  # nothing else hooks the layer: its forward is nn.Linear's / nn.Conv2d's
        self._orphaned = False
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
        if forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path={forward_path!r}; accepted: {', '.join(FORWARD_PATHS)}")
        # bypass: never fold into the base weight (quantised bases): base(x) + delta(x)
        self.forward_path = "structured" if bypass else forward_path
        self.bypass = bypass
        self.dora_axis = dora_axis
        self.dora_detach_norm = dora_detach_norm
        self._w0_sq_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self._cost_cache: Optional[Tuple[int, int]] = None
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

    # ----- the base layer and the forward below ---------------------------------------------
    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def apply_to(self) -> None:
        """Route the layer's forward through this adapter, keeping the forward that was there
        (the class's, or another network's hook) to call below."""
        if self._org_forward is not None:
            return
        layer = self.layer
        self._had_own_forward = "forward" in layer.__dict__
        self._org_forward = layer.forward
        self._plain = not self._had_own_forward and type(layer).forward in _PLAIN_FORWARDS
        self._costs()
        layer.forward = self.forward

    def remove(self) -> None:
        """Unhook. If another hook was installed over this one, it still calls this adapter, which
        then only passes through to the forward below (so neither is lost)."""
        if self._org_forward is None:
            return
        layer = self.layer
        if layer.__dict__.get("forward") != self.forward:
            self._orphaned = True
            return
        if self._had_own_forward:
            layer.forward = self._org_forward
        else:
            del layer.forward  # back to the class method
        self._org_forward = None
        self._plain = True

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._org_forward is not None:
            return self._org_forward(x, *args, **kwargs)
        return type(self.layer).forward(self.layer, x, *args, **kwargs)

    def weight_below(self) -> Optional[torch.Tensor]:
        """The weight the forward below behaves as (see ``weight_of``); None when unknown."""
        if self._plain or self._org_forward is None:
            return self.layer.weight
        return weight_of(self._org_forward, self.layer)

    @torch.no_grad()
    def effective_weight(self) -> Optional[torch.Tensor]:
        """The weight the layer behaves as up to and including this adapter (eval, fp32)."""
        below = self.weight_below()
        if below is None or self._orphaned or not self.enabled or self.multiplier == 0:
            return below
        return self.merged_weight(base=below.detach())

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

    def _gain(self):
        """g, times the trainable scalar with use_scalar (a tensor then)."""
        return self.scale if self.scalar is None else self.scale * self.scalar

    def delta(self, tensors: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """g * dW from the algorithm's math definition, shaped like the base weight (times the
        trainable scalar with use_scalar); ``tensors`` replaces the stored ones (e.g. masked)."""
        d = self.math.delta(self.tensors() if tensors is None else tensors, self.geometry.weight_shape)
        return d.reshape(self.geometry.weight_shape) * self._gain()

    @torch.no_grad()
    def delta_norm(self) -> float:
        """||g * dW||_F (no dropout, multiplier 1): what --scale_weight_norms bounds. From factor
        identities (Gram matrices, ||kron||), without building dW."""
        t = {k: v.detach().double() for k, v in self.tensors().items()}
        sq = self.math.norm_sq(t, self.geometry)
        gain = abs(self.scale * (1.0 if self.scalar is None else float(self.scalar)))
        return gain * float(sq.clamp_min(0.0)) ** 0.5

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
        """The weight the layer behaves as over ``base`` (default: the weight below), in fp32."""
        m = self.multiplier if multiplier is None else multiplier
        if base is None:
            base = self.weight_below()
            base = self.layer.weight if base is None else base
        w0 = base.float()
        with no_autocast(w0.device.type):
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
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        m = self._live_multiplier()
        if m is None:
            return self.base_forward(x, *args, **kwargs)
        if self.dora_axis is not None:
            return self._dora_forward(x, m, args, kwargs)
        t = self.tensors()
        if self._fold(x, args, kwargs):
            return self._folded(x, t, m)
        return self.base_forward(x, *args, **kwargs) + self._delta_out(x, t, m * self._gain())

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

    def _delta_out(self, x: torch.Tensor, t: Dict[str, torch.Tensor], gain, per_sample: bool = True) -> torch.Tensor:
        """gain * dW(x) on the structured path, with the training dropouts on the rank activation:
        neuron dropout elementwise, rank dropout one mask per sample and rank component (kohya's
        networks.lora semantics; its 1/(1-p) folded into the gain). With DoRA rank dropout acts on
        the weight instead (``per_sample=False``, see ``_dora_tensors``)."""
        p = self.dropout if self.training else None
        q = self.rank_dropout if self.training and per_sample else None
        if p is None and q is None:
            return self.math.apply(t, x, self.geometry, gain, None)
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

        return self.math.apply(t, x, self.geometry, gain, hidden)

    # ----- choosing a path -------------------------------------------------------------------
    def _grad_wanted(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _fold(self, x: torch.Tensor, args, kwargs, dora: bool = False) -> bool:
        """Fold W0 + m*dW into one op? Only over the plain layer and with no per-sample training
        dropout; then by forward_path, or in 'auto' by the cost model on this call's shapes."""
        if args or kwargs or not self._plain or self.forward_path == "structured":
            return False
        if self.training and (self.dropout is not None or (self.rank_dropout is not None and not dora)):
            return False
        if self.forward_path == "fold":
            return True
        g = self.geometry
        per, build = self._costs()
        dense = g.out_dim * g.in_dim * g.kernel_area
        tokens = g.positions(x)
        if dora:  # norms (identities cost about one build) and the input/output rescaling
            build, per = build + 2 * dense, per + g.in_dim
        if self._grad_wanted():  # fold: build fwd + rebuild + bwd, and a dense weight gradient
            return 3 * build + tokens * dense < 3 * tokens * (per + g.out_dim)
        return build + dense < tokens * (per + g.out_dim)

    def _costs(self) -> Tuple[int, int]:
        """The cost model's inputs, from shapes only (computed once; apply_to fills it outside any
        torch.compile trace)."""
        if self._cost_cache is None:
            self._cost_cache = self.math.costs(self.tensors(), self.geometry)
        return self._cost_cache

    def _folded(self, x: torch.Tensor, t: Dict[str, torch.Tensor], m) -> torch.Tensor:
        """One op with the merged weight W0 + m*g*dW (DoRA: W0 + m*(W_d - W0)), computed in fp32
        and stored as the base is. In training, backward rebuilds it instead of storing it."""
        layer, g = self.layer, self.geometry
        w0, bias = layer.weight, layer.bias
        names = list(t)
        n = len(names)
        params = list(t.values())
        if self.scalar is not None:
            params.append(self.scalar)
        if self.dora_axis is not None:
            params.append(self.dora_scale)
        has_scalar, axis, detach = self.scalar is not None, self.dora_axis, self.dora_detach_norm
        scale, math_ = self.scale, self.math
        out_dtype = w0.dtype if w0.element_size() >= 2 else x.dtype  # fp8 bases: the activations' dtype

        def weight_fn(*ps: torch.Tensor) -> torch.Tensor:
            gain = scale * ps[n] if has_scalar else scale
            d = gain * math_.delta(dict(zip(names, ps[:n])), g.weight_shape).reshape(g.weight_shape).float()
            if axis is None:
                return (w0.float() + m * d).to(out_dtype)
            return dora_math.merge(w0.float(), d, ps[-1].float(), axis, m, detach_norm=detach).to(out_dtype)

        cdt = autocast_dtype(x.device.type) or x.dtype
        with no_autocast(x.device.type):
            if not self._grad_wanted() or is_compiling() or isinstance(g.padding, str):
                return g.apply(x.to(cdt), weight_fn(*params).to(cdt), None if bias is None else bias.to(cdt))
            return _FoldedOp.apply(x.to(cdt), bias, g, weight_fn, *params)

    # ----- DoRA ------------------------------------------------------------------------------
    def _dora_tensors(self) -> Dict[str, torch.Tensor]:
        """The stored tensors; in training with rank_dropout, one mask per step over the rank
        components (the norm is of one weight, so the mask cannot differ per sample)."""
        t = dict(self.tensors())
        if self.training and self.rank_dropout is not None:
            key, dim = self.math.components(t)
            keep = (torch.rand(t[key].shape[dim], device=t[key].device) > self.rank_dropout).to(t[key].dtype)
            shape = [1] * t[key].dim()
            shape[dim] = -1
            t[key] = t[key] * keep.reshape(shape) / (1.0 - self.rank_dropout)
        return t

    def _w0_sq(self, w: torch.Tensor) -> torch.Tensor:
        """||W0||^2 on the DoRA axis, cached while the frozen weight is unchanged."""
        if is_compiling() or w.requires_grad:
            return dora_math.weight_norm(w, self.dora_axis).pow(2).flatten()
        key = (w.data_ptr(), w._version, w.device, w.dtype, w.shape)
        if self._w0_sq_cache is None or self._w0_sq_cache[0] != key:
            self._w0_sq_cache = (key, dora_math.weight_norm(w.detach(), self.dora_axis).pow(2).flatten())
        return self._w0_sq_cache[1]

    def dora_factor(self, t: Dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """s = dora_scale / ||base + g*dW|| per input column or output row, flat, fp32, from the
        factor identities where the algorithm has them (no dense V), else from a dense delta
        that backward recomputes instead of storing."""
        axis, g = self.dora_axis, self.geometry
        gain = self._gain()
        magnitude = self.dora_scale.float().flatten()
        with no_autocast(base.device.type):
            pair = self.math.dora_pair(t)
            kron = self.math.dora_kron(t, g) if pair is None and hasattr(self.math, "dora_kron") else None
            if pair is not None or kron is not None:
                w0_sq = self._w0_sq(base) if base is self.layer.weight else \
                    dora_math.weight_norm(base, axis).pow(2).flatten()
                if pair is not None:
                    return dora_math.pair_scale(*pair, base.flatten(1), w0_sq, magnitude, axis, gain,
                                                self.dora_detach_norm)
                return dora_math.kron_scale(*kron, base.flatten(1), w0_sq, magnitude, axis, gain,
                                            self.dora_detach_norm)
            names = list(t)

            def norms(*ps: torch.Tensor) -> torch.Tensor:
                d = self.math.delta(dict(zip(names, ps)), g.weight_shape).reshape(g.weight_shape)
                return dora_math.weight_norm(base.float() + gain * d.float(), axis).flatten()

            ps = [v.float() for v in t.values()]
            if self._grad_wanted() and not is_compiling():
                from torch.utils.checkpoint import checkpoint

                n = checkpoint(norms, *ps, use_reentrant=False)
            else:
                n = norms(*ps)
            if self.dora_detach_norm:
                n = n.detach()
            return magnitude / n

    def _dora_forward(self, x: torch.Tensor, m, args, kwargs) -> torch.Tensor:
        """W = W' + m*(V*s - W') with V = W' + g*dW, s = dora_scale/||V||, W' the weight below.

        Input axis: scaling input columns commutes with the layer, so
            y = below((1 - m + m*s) * x) + m*g*dW(s*x)
        Output axis: y = below(x) + m*((s - 1) * (below(x) - bias) + s * g*dW(x)).
        Over a forward below that is not a weight (an unknown hook), its output is kept as it is
        and this module adds m*(W_d - W0)x with the norm taken of the layer's stored weight W0."""
        t = self._dora_tensors()
        if self._fold(x, args, kwargs, dora=True):
            return self._folded(x, t, m)
        axis, g = self.dora_axis, self.geometry
        below = self.weight_below()
        known = below is not None
        s = self.dora_factor(t, below if known else self.layer.weight)
        gain = m * self._gain()
        if axis == dora_math.INPUT:
            sx = x * g.channel_view(s, x).to(x.dtype)
            out = self._delta_out(sx, t, gain, per_sample=False)
            if not known:
                x_rest = x * g.channel_view(s - 1, x).to(x.dtype)
                w0 = self.layer.weight.to(x.dtype)
                return self.base_forward(x, *args, **kwargs) + m * g.apply(x_rest, w0) + out
            if not isinstance(m, torch.Tensor) and m == 1.0:
                return self.base_forward(sx, *args, **kwargs) + out
            xb = x * g.channel_view(1 - m + m * s, x).to(x.dtype)
            return self.base_forward(xb, *args, **kwargs) + out
        y = self.base_forward(x, *args, **kwargs)
        if known:
            bias = self.layer.bias
            y0 = y if bias is None else y - g.channel_view(bias, y).to(y.dtype)
        else:
            y0 = g.apply(x, self.layer.weight.to(x.dtype))
        sv = g.channel_view(s, y).to(y.dtype)
        return y + m * ((sv - 1) * y0) + sv * self._delta_out(x, t, gain, per_sample=False)

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


def kaiming(t: torch.Tensor) -> torch.Tensor:
    """kaiming_uniform(a=sqrt(5)) as torch Linear and kohya's LoRA initialise lora_down."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
