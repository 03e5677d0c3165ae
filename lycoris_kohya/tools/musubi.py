"""What musubi-tuner's inference merge reads of a file (its generate scripts' --lora_weight without
--lycoris, and its merge script): ``utils/lora_utils.py`` with ``networks/loha.py`` and
``networks/lokr.py`` ``merge_weights_to_tensor`` (musubi-tuner 30c658c, read for these facts):

- A file is one network type: the first tensor key (in sorted order, as safetensors lists them)
  holding ``lora_down``, ``hada_w1_a`` or ``lokr_w1`` decides LoRA, LoHa or LoKr; modules of another
  algorithm are left out (their keys end in a "not all LoRA keys are used" warning).
- LoRA: ``W + m * alpha/r * up @ down`` for Linears and 1x1/kxk convolutions; ``lora_mid`` is not read.
- LoHa: ``(w1a @ w1b) * (w2a @ w2b) * alpha/r``, Linear only; no Tucker (``hada_t1/t2``).
- LoKr: a full ``lokr_w1`` only (``lokr_w1_a/b`` modules are left out); ``lokr_w2`` full (scale 1) or
  ``lokr_w2_a @ lokr_w2_b`` (scale alpha/r); Linear only; no Tucker (``lokr_t2``).
- ``dora_scale`` is not read: a DoRA module is applied as its plain delta. ``diff`` is not read.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

from .. import specs as sp
from ..algos import locon, loha, lokr

#: the key fragment that makes musubi read a file as each type, in the order it tests them
TYPE_KEYS = (("locon", locon.DOWN), ("loha", loha.W1A), ("lokr", lokr.W1))


def file_type(keys: Iterable[str]) -> str:
    """The algorithm musubi reads the whole file as (its ``detect_network_type``)."""
    for key in sorted(keys):
        for algo, fragment in TYPE_KEYS:
            if fragment in key:
                return algo
    return "locon"  # its default


def _linear(m: sp.StoredModule) -> Optional[bool]:
    """True for a Linear layer, False for a convolution, None where the file does not say."""
    return None if m.weight_shape is None else len(m.weight_shape) == 2


def problem(m: sp.StoredModule, as_type: str) -> Optional[str]:
    """Why musubi does not apply this module as trained when it reads the file as ``as_type``
    (None: it does, or does if the layer is a Linear where the file does not tell)."""
    if m.algo == sp.DIFF:
        return "left out (a full weight difference: musubi reads no diff)"
    if m.algo != as_type:
        return f"left out (the file is read as {as_type})"
    if m.dora_axis is not None:
        return "applied without its DoRA decomposition (dora_scale is not read)"
    if m.algo == "locon":
        return "lora_mid not read (a wrong kernel)" if locon.MID in m.factors else None
    if _linear(m) is False:
        return f"fails (musubi's {m.algo} merge is Linear only)"
    if m.tucker:
        return "Tucker factors not read"
    if m.algo == "lokr" and lokr.W1 not in m.factors:
        return "left out (a factorised lokr_w1: musubi reads a full one only)"
    return None


def issues(modules: Mapping[str, sp.StoredModule], keys: Iterable[str]) -> List[str]:
    """One line per kind of problem, with its count, for ``inspect``."""
    as_type = file_type(keys)
    counts: Dict[str, int] = {}
    for m in modules.values():
        why = problem(m, as_type)
        if why is not None:
            counts[why] = counts.get(why, 0) + 1
    return [f"{n} modules: {why}" for why, n in counts.items()]


def native(modules: Mapping[str, sp.StoredModule]) -> Optional[str]:
    """The algorithm a file can keep for musubi (every module one algorithm that musubi's merge
    applies exactly once ``convert`` has done its exact rewrites: LoCon's lora_mid folded, LoKr's
    lokr_w1_a/b multiplied out), or None: the file must become LoCon."""
    algos = {m.algo for m in modules.values()}
    if len(algos) != 1 or any(m.dora_axis is not None for m in modules.values()):
        return None
    algo = algos.pop()
    if algo == "locon":
        return algo
    if algo in ("loha", "lokr") and all(_linear(m) is not False and not m.tucker for m in modules.values()):
        return algo
    return None


# ----- the --lycoris path: lycoris-lora's create_network_from_weights + merge_to ------------------
def lycoris_issues(modules: Mapping[str, sp.StoredModule]) -> List[str]:
    """What musubi's generate scripts with ``--lycoris`` compute (lycoris-lora 4.1.3's
    ``create_network_from_weights(multiplier=m, ...)`` then ``merge_to``, measured against this
    package's merge): every module at multiplier 1 whatever m is; LoHa and LoKr with g applied twice;
    input-axis DoRA does not load (lycoris-lora has the output axis only)."""
    input_dora = sum(1 for m in modules.values() if m.dora_axis == "input")
    twice = [m for m in modules.values() if m.algo in ("loha", "lokr") and m.scale != 1.0]
    out = ["merges every module at multiplier 1, whatever --lora_multiplier asks"]
    if twice:
        gs = sorted({round(m.scale, 6) for m in twice})
        out.append(f"{len(twice)} LoHa/LoKr modules get g = alpha/rank twice (g = {', '.join(f'{g:g}' for g in gs[:3])}"
                   f"{', ...' if len(gs) > 3 else ''}: that many times their change)")
    if input_dora:
        out.append(f"fails to load the file: {input_dora} input-axis DoRA modules (lycoris-lora has the output "
                   "axis only)")
    return out
