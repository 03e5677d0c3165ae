"""The forward chain of one layer: a hook replaces ``layer.forward`` and calls the forward that was
there before it (the class's, another network of ours, sd-scripts' ``networks.lora``,
ControlNet-LLLite, an fp8 patch ...), so that every network on the layer keeps its effect.

``weight_of`` walks that chain down to say which weight the forward below behaves as, where every
hook below is a known weight-space change; None where one is not (its output is then taken as it is).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import foreign

PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward)


class LayerHook(nn.Module):
    """Installs itself as one layer's forward. The layer is held, not registered as a submodule.
    Subclasses implement ``forward`` (calling ``base_forward``) and ``effective_weight``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._layer = [layer]  # a list so the base layer is not registered as a submodule
        self._org_forward: Optional[Callable] = None
        self._had_own_forward = False
        #: nothing else hooks the layer: its forward is nn.Linear's / nn.Conv2d's
        self._plain = True
        #: removed while another hook above still calls it: it passes through from then on
        self._orphaned = False

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def apply_to(self) -> None:
        """Route the layer's forward through this hook, keeping the forward that was there."""
        if self._org_forward is not None:
            return
        layer = self.layer
        self._had_own_forward = "forward" in layer.__dict__
        self._org_forward = layer.forward
        # a quantised layer (musubi's --fp8_scaled) is never plain: its weight is not the stored tensor
        self._plain = (not self._had_own_forward and type(layer).forward in PLAIN_FORWARDS
                       and not foreign.is_fp8_scaled(layer))
        layer.forward = self.forward

    def remove(self) -> None:
        """Unhook. If another hook was installed over this one, it still calls this one, which then
        only passes through to the forward below (so neither is lost)."""
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
        """The weight the forward below behaves as (see ``weight_of``); None when unknown. Not
        installed: the weight of the layer's own forward (``foreign.stored_weight``)."""
        if self._org_forward is None:
            return foreign.stored_weight(self.layer)
        if self._plain:
            return self.layer.weight
        return weight_of(self._org_forward, self.layer)

    def effective_weight(self) -> Optional[torch.Tensor]:
        """The weight the layer behaves as up to and including this hook; None when unknown."""
        raise NotImplementedError


def weight_of(forward: Callable, layer: nn.Module) -> Optional[torch.Tensor]:
    """The weight a layer's forward behaves as, walking down the chain of hooks installed on it:
    the layer's own weight, plus what every hook of ours and every recognised foreign module
    below adds (detached, fp32). None when some hook below is not a weight-space change.
    The layer's own forward replaced on the instance is known only for a quantised layer (musubi's
    --fp8_scaled): the dequantised weight, read now, never the stored fp8 tensor (in the compute
    dtype, see ``foreign.dequantised``)."""
    owner, func = getattr(forward, "__self__", None), getattr(forward, "__func__", None)
    if owner is layer:
        if func in PLAIN_FORWARDS:
            return layer.weight.detach()
        return foreign.dequantised(layer) if foreign.is_fp8_scaled(layer) else None
    if isinstance(owner, LayerHook) and owner.layer is layer:
        return owner.effective_weight()
    below_forward = foreign.forward_below(owner)
    if below_forward is None:
        return None
    below = weight_of(below_forward, layer)
    return None if below is None else foreign.weight_over(owner, below)
