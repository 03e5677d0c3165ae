"""musubi-tuner files for families whose ComfyUI model fuses layers musubi trains apart. Z-Image:
musubi's attention has ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``; ComfyUI's one ``qkv`` Linear (q, k,
v stacked by rows) and ``out``. HunyuanVideo 1.5: musubi's double blocks have ``img_attn_q/k/v``,
``img_mod.linear``, ``img_mlp.fc1/fc2`` (and txt_); ComfyUI's ``img_attn_qkv``, ``img_mod.lin``,
``img_mlp.0/2``. (The names as musubi-tuner's ``networks/convert_z_image_lora_to_comfy.py`` and
``convert_hunyuan_video_1_5_lora_to_comfy.py`` write them for ComfyUI.)

``fuse`` writes one q/k/v triple as one module of the fused layer whose change is the three changes
stacked, exactly: LoCon as its ``lora_down``s concatenated under a block-diagonal ``lora_up``, LoHa the
same for each Hadamard factor, each part's g multiplied into its up factor and alpha set to the fused
rank (so g = 1); anything else (LoKr, DoRA, Tucker, a part missing) as a LoCon of the stacked change
at its full numerical rank (an SVD: exact up to float rounding, the error measured and reported).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .. import specs as sp
from ..algos import locon, loha
from .common import ToolError


@dataclass(frozen=True)
class FusedFamily:
    family: str
    detect: "re.Pattern[str]"  # a module name only this family's unfused files have
    qkv: "re.Pattern[str]"  # (fused name prefix, "q"|"k"|"v")
    renames: Tuple[Tuple[str, str], ...]
    rename_where: str  # renames apply to names containing this (as musubi's converters do)

    def comfy_name(self, name: str) -> str:
        if self.rename_where in name:
            for old, new in self.renames:
                name = name.replace(old, new)
        return name

    def triples(self, names) -> Dict[str, Dict[str, str]]:
        """fused module name -> {"q"|"k"|"v": module name} for every layer with any of them."""
        out: Dict[str, Dict[str, str]] = {}
        for n in names:
            m = self.qkv.match(n)
            if m:
                out.setdefault(self.comfy_name(m.group(1) + "qkv"), {})[m.group(2)] = n
        return out

    def unfused(self, names) -> int:
        """How many modules ComfyUI's model has no layer of that name for."""
        return sum(1 for n in names if self.comfy_name(n) != n or self.qkv.match(n))


FAMILIES = (
    FusedFamily("Z-Image", re.compile(r"^lora_unet_layers_\d+_attention_to_[qkv]$"),
                re.compile(r"^(lora_unet_.*attention_)to_([qkv])$"),
                (("attention_to_out_0", "attention_out"), ("attention_norm_k", "attention_k_norm"),
                 ("attention_norm_q", "attention_q_norm")), "layers"),
    FusedFamily("HunyuanVideo 1.5", re.compile(r"^lora_unet_double_blocks_\d+_(img|txt)_attn_[qkv]$"),
                re.compile(r"^(lora_unet_double_blocks_\d+_(?:img|txt)_attn_)([qkv])$"),
                tuple((f"{side}_{old}", f"{side}_{new}") for side in ("img", "txt")
                      for old, new in (("mlp_fc1", "mlp_0"), ("mlp_fc2", "mlp_2"), ("mod_linear", "mod_lin"))),
                "double_blocks"),
)


def family_of(names) -> Optional[FusedFamily]:
    """The family whose ComfyUI model fuses what this file adapts apart, or None."""
    names = list(names)
    return next((f for f in FAMILIES if any(f.detect.match(n) for n in names)), None)


def _stackable(parts: List[sp.StoredModule]) -> Optional[str]:
    """The algorithm three parts share and can be stacked in exactly (LoCon, LoHa), or None."""
    if len(parts) != 3 or len({p.algo for p in parts}) != 1 or parts[0].algo not in ("locon", "loha"):
        return None
    if any(p.dora_axis is not None or p.tucker or locon.MID in p.factors for p in parts):
        return None
    return parts[0].algo


def _stacked_locon(parts: List[sp.StoredModule], dt) -> Dict[str, torch.Tensor]:
    ups = [p.factors[locon.UP].float().flatten(1) * p.scale for p in parts]
    down = torch.cat([p.factors[locon.DOWN].float().flatten(1) for p in parts])
    return {locon.DOWN: down.to(dt), locon.UP: torch.block_diag(*ups).to(dt), "alpha": torch.tensor(float(down.shape[0]))}


def _stacked_loha(parts: List[sp.StoredModule], dt) -> Dict[str, torch.Tensor]:
    f = [{k: v.float() for k, v in p.factors.items()} for p in parts]
    w1b = torch.cat([t[loha.W1B] for t in f])
    return {loha.W1A: torch.block_diag(*[t[loha.W1A] * p.scale for t, p in zip(f, parts)]).to(dt),
            loha.W1B: w1b.to(dt),
            loha.W2A: torch.block_diag(*[t[loha.W2A] for t in f]).to(dt),
            loha.W2B: torch.cat([t[loha.W2B] for t in f]).to(dt),
            "alpha": torch.tensor(float(w1b.shape[0]))}


def fuse(parts: Mapping[str, sp.StoredModule], w0s: Mapping[str, Optional[torch.Tensor]], dtype,
         as_locon) -> Tuple[Dict[str, torch.Tensor], str, float, Optional[float]]:
    """(tensors of the fused module, what was done, relative error, ||the stacked change|| or None)
    for the parts present (by "q"/"k"/"v"); ``w0s`` their base weights (DoRA needs them);
    ``as_locon(d, dtype, name)`` the exact LoCon fit of a dense change."""
    present = [parts[c] for c in "qkv" if c in parts]
    dt = dtype or next(iter(present[0].factors.values())).dtype
    algo = _stackable(present)
    if algo == "locon":
        return _stacked_locon(present, dt), "q/k/v stacked into one LoCon of qkv", 0.0, None
    if algo == "loha":
        return _stacked_loha(present, dt), "q/k/v stacked into one LoHa of qkv", 0.0, None
    changes = []
    rows = present[0].flat[0]
    for c in "qkv":
        p = parts.get(c)
        if p is None:  # a part the file does not adapt changes nothing (Z-Image's q, k, v are alike)
            changes.append(torch.zeros(rows, present[0].flat[1]))
        elif p.dora_axis is not None:
            w0 = w0s.get(c)
            if w0 is None:
                raise ToolError(f"{p.name}: DoRA stacked into qkv depends on the base weight; give the base model "
                                "(--base)")
            changes.append(p.change(w0, 1.0).float().flatten(1))
        else:
            changes.append(p.delta_flat())
    t, what, err, norm = as_locon(torch.cat(changes), dt, present[0].name)
    return t, f"q/k/v ({', '.join(sorted({p.algo for p in present}))}) stacked into qkv -> {what}", err, norm
