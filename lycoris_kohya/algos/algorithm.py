"""What an algorithm is: one object that owns a tensor layout and its math.

An algorithm (LoCon, LoHa, LoKr) is a stateless object; everything that reads or writes its tensors
asks it: the adapter (training forward, merge, max-norm), ``specs`` (files), the tools and the
diffusers API. Its tensors are passed as a mapping from the file's suffixes (``lora_down.weight``,
``hada_w1_a``, ...) to tensors; ``g`` is the wrapped layer's ``LayerGeometry``.

  layout:  ``suffixes``; ``plan(g, rank, **options)`` the layout a new adapter gets;
           ``init(layout, g, use_scalar)`` its fresh tensors; ``layout(t, g)`` the layout of stored
           tensors, from shapes alone (ValueError when they do not fit the layer); ``flat_shape(t)``
           and ``weight_shape(t)`` the layer's shape as far as the tensors tell; ``rank_bound(t)``.
  math:    ``delta(t, shape)`` the dense dW, the one definition every other form is tested against;
           ``apply(t, x, g, out_scale, hidden)`` the same map applied to x without building dW;
           ``norm_sq(t, g)`` ||dW||^2 from factor identities; ``factored(t, g)`` a product form
           (``LowRank`` or ``Kron``) DoRA takes its norms from, or None; ``components(t)`` what
           rank dropout drops; ``costs(t, g)`` the path policy's multiply-add counts.

Adding an algorithm is one file defining such an object and a line in ``algos/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .geometry import LayerGeometry, alpha_scale

Tensors = Mapping[str, torch.Tensor]
Shape = Tuple[int, ...]
#: sees the rank activation ``h`` with its components along ``dim`` (samples along 0): the training dropouts
Hidden = Optional[Callable[[torch.Tensor, int], torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """The layout facts of one module that are not sizes of the layer: its rank and Tucker form."""

    rank: int
    tucker: bool = False

    @property
    def use_alpha(self) -> bool:
        """Whether g = alpha/rank applies (False: g = 1 whatever alpha says)."""
        return True

    def flags(self) -> Dict[str, bool]:
        """The booleans a saved file's metadata summarises this layout by."""
        return {"use_tucker": self.tucker}


@dataclass(frozen=True)
class LowRank:
    """dW = P^T Q on the flattened [out, in*k] weight: P [R, out], Q [R, in*k]."""

    p: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True)
class Kron:
    """dW = kron(w1 [a, c], w2 [b, d*k]) on the flattened [out, in*k] weight."""

    w1: torch.Tensor
    w2: torch.Tensor


class Algorithm:
    """The contract (see the module docstring); subclasses implement every method."""

    name: str = ""
    suffixes: Tuple[str, ...] = ()
    #: tensors sd-scripts' LoRA+ trains at lr x ratio (the "up" side)
    plus: Tuple[str, ...] = ()

    def owns(self, suffixes) -> bool:
        """Whether a module whose tensors have these suffixes (alpha, dora_scale apart) is this algorithm's."""
        s = set(suffixes)
        return bool(s) and s <= set(self.suffixes)

    def scale(self, layout: Layout, alpha: Optional[float]) -> float:
        """g: alpha/rank (1 without alpha, or where the layout ignores alpha)."""
        return alpha_scale(alpha, layout.rank) if layout.use_alpha else 1.0

    def plan_note(self, layout: Layout, rank: int, options: Mapping[str, object]) -> Optional[str]:
        """A note for the training log where a planned layout is not what the options alone suggest; None if it is."""
        return None

    # layout
    def plan(self, g: LayerGeometry, rank: int, use_tucker: bool = False, **_) -> Layout:
        """The layout a new adapter gets: the rank, and Tucker where asked and the layer is a kxk conv."""
        return Layout(rank, bool(use_tucker and g.is_kxk))

    def init(self, layout: Layout, g: LayerGeometry, use_scalar: bool) -> Tuple[Dict[str, torch.Tensor], str]:
        """(fresh tensors in creation order, the one that starts at zero so that dW = 0; with
        use_scalar it is random and a trainable scalar starting at 0 plays that role)."""
        raise NotImplementedError

    def layout(self, t: Tensors, g: LayerGeometry) -> Layout:
        raise NotImplementedError

    def flat_shape(self, t: Tensors) -> Tuple[int, int]:
        """[out, in*kh*kw] of the layer, which every algorithm's tensors determine."""
        raise NotImplementedError

    def weight_shape(self, t: Tensors) -> Optional[Shape]:
        """The layer's weight shape where the tensors alone determine it, else None."""
        raise NotImplementedError

    def rank_bound(self, t: Tensors) -> int:
        """An upper bound of the rank of the flattened dW."""
        raise NotImplementedError

    # math
    def delta(self, t: Tensors, weight_shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, t: Tensors, x: torch.Tensor, g: LayerGeometry, out_scale, hidden: Hidden = None) -> torch.Tensor:
        raise NotImplementedError

    def norm_sq(self, t: Tensors, g: LayerGeometry) -> torch.Tensor:
        raise NotImplementedError

    def factored(self, t: Tensors, g: LayerGeometry) -> Optional[Union[LowRank, Kron]]:
        return None

    def components(self, t: Tensors) -> Tuple[str, int]:
        """(tensor, dim): the rank components are its slices along dim."""
        raise NotImplementedError

    def costs(self, t: Tensors, g: LayerGeometry) -> Tuple[int, int]:
        """(multiply-adds per output position of apply(), multiply-adds to build dW densely)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"
