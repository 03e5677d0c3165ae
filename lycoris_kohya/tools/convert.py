"""``lycoris-kohya convert FILE --for comfyui|a1111|diffusers|all --out OUT [--base MODEL]``: rewrite a
file into a layout the target applies exactly as trained."""
from __future__ import annotations

import json
import math
from typing import Dict, Optional, Tuple

import torch

from .. import specs as sp
from ..algos import dora as dora_math
from ..algos import locon, lokr
from . import lowrank
from .checkpoint import Checkpoint, parse_dtype
from .common import ToolError, check_rank, module_tensors, progress, read_adapter, save_adapter

TARGETS = ("comfyui", "a1111", "diffusers", "all")
HELP = "rewrite a file so that a UI or library applies it exactly as trained"
DESCRIPTION = HELP + """. comfyui: LoKr Tucker (lokr_t2, which ComfyUI skips silently) folded into a
full lokr_w2; output-axis DoRA (ComfyUI divides by ||W0||) written as the full weight difference
W_d - W0 (a "diff" tensor: W = W0 + m*diff is exact at every strength, since W_d - W0 is linear in m).
a1111: output-axis DoRA (not implemented there) as "diff". diffusers and all (one file every target
applies: plain LoCon): Tucker LoCon folded exactly; LoHa, LoKr and DoRA (as W_d - W0) factorised by SVD
at their full numerical rank (exact up to float rounding, measured and reported). DoRA to "diff" or
LoCon needs the base model (--base). What cannot be written exactly is refused with the reason; with
--allow-lossy --rank R it is truncated to rank R and the error reported."""


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=HELP, description=DESCRIPTION)
    p.add_argument("file", help="adapter file")
    p.add_argument("--for", dest="target", required=True, choices=TARGETS, help="the tool that will apply it")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--base", metavar="MODEL", help="base model (diffusers folder with unet/ and text_encoder/, or a "
                   "single-file checkpoint): needed for DoRA conversions and for layer shapes LoHa/LoKr files omit")
    p.add_argument("--allow-lossy", action="store_true", help="allow truncation to --rank (SVD), reporting the error")
    p.add_argument("--rank", type=int, help="with --allow-lossy: the largest rank of LoCon modules written by SVD")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output dtype (default: the input's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def fold_lokr_t2(m: sp.StoredModule) -> Dict[str, torch.Tensor]:
    """LoKr Tucker -> the same module with a full ``lokr_w2`` holding g*W2, and alpha set so that
    every reader's g is 1: alpha is ignored when both factors are full, and is rank(lokr_w1_b)
    when only w1 is factorised."""
    t = {k: v.float() for k, v in m.factors.items()}
    b, d, kernel = t[lokr.W2A].shape[1], t[lokr.W2B].shape[1], tuple(t[lokr.T2].shape[2:])
    # the one LoKr definition with a 1x1 lokr_w1 of 1 gives w2 itself: kron([[1]], w2) = w2
    w2 = lokr.LOKR.delta({lokr.W1: torch.ones(1, 1), lokr.W2A: t[lokr.W2A], lokr.W2B: t[lokr.W2B], lokr.T2: t[lokr.T2]},
                    (b, d, *kernel))
    out = {k: v for k, v in m.factors.items() if k in (lokr.W1, lokr.W1A, lokr.W1B)}
    out[lokr.W2] = w2 * m.scale
    out["alpha"] = torch.tensor(float(t[lokr.W1B].shape[0]) if lokr.W1B in t else (m.alpha or 1.0))
    if m.dora_scale is not None:
        out["dora_scale"] = m.dora_scale
    return out


def _as_locon(d: torch.Tensor, rank: Optional[int], allow_lossy: bool, dtype, name: str,
              bound: Optional[int] = None) -> Tuple[Dict, str, float, float]:
    exact = lowrank.svd_fit(d, None, None, dtype, bound)
    if rank is None or rank >= exact.rank:
        return exact.tensors, f"LoCon rank {exact.rank} (full numerical rank)", exact.relative_error, exact.norm
    if not allow_lossy:
        raise ToolError(f"{name}: needs rank {exact.rank} to be exact; --rank {rank} truncates it: add --allow-lossy")
    f = lowrank.svd_fit(d, rank, None, dtype, bound)
    return f.tensors, f"LoCon rank {f.rank} (truncated from {exact.rank})", f.relative_error, f.norm


def convert_module(m: sp.StoredModule, target: str, w0: Optional[torch.Tensor], rank: Optional[int],
                   allow_lossy: bool, dtype: Optional[torch.dtype]) -> Tuple[Dict[str, torch.Tensor], str, float, float]:
    """(tensors, what was done, relative error, ||what the error is relative to||) for one module."""
    dt = dtype or next(iter(m.factors.values())).dtype

    def cast(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: (v if k == "dora_scale" else v.to(dt)) for k, v in t.items()}

    def unchanged() -> Dict[str, torch.Tensor]:
        t = dict(m.factors)
        if m.alpha is not None:
            t["alpha"] = torch.tensor(m.alpha)
        if m.dora_scale is not None:
            t["dora_scale"] = m.dora_scale
        return cast(t)

    def base_needed(why: str) -> torch.Tensor:
        if w0 is None:
            raise ToolError(f"{m.name}: {why} depends on the base weight; give the base model (--base)")
        return w0

    if target in ("comfyui", "a1111"):
        if m.dora_axis == dora_math.OUTPUT:
            diff = m.change(base_needed("output-axis DoRA as a weight difference"), 1.0)
            return {sp.DIFF: diff.to(dt)}, "output-axis DoRA -> diff (W_d - W0)", 0.0, None
        if target == "comfyui" and lokr.T2 in m.factors:
            return cast(fold_lokr_t2(m)), "lokr_t2 folded into a full lokr_w2", 0.0, None
        return unchanged(), "unchanged", 0.0, None
    # diffusers / all: plain LoCon only
    if m.dora_axis is not None:
        d = m.change(base_needed("DoRA as LoCon"), 1.0)
        t, what, err, norm = _as_locon(d, rank, allow_lossy, dt, m.name)
        return t, f"{m.dora_axis}-axis DoRA (W_d - W0) -> {what}", err, norm
    if m.algo == "locon":
        if locon.MID in m.factors:
            return cast(lowrank.fold_tucker(unchanged(), m.weight_shape)), "lora_mid folded into lora_down", 0.0, None
        return unchanged(), "unchanged", 0.0, None
    t, what, err, norm = _as_locon(m.delta(), rank, allow_lossy, dt, m.name, m.rank_bound)
    return t, f"{m.algo} -> {what}", err, norm


def convert(path: str, target: str, out: str, base: Optional[str] = None, allow_lossy: bool = False,
            rank: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Dict:
    if target not in TARGETS:
        raise ToolError(f"--for {target!r}: expected one of {', '.join(TARGETS)}")
    check_rank(rank)
    if rank is not None and not allow_lossy:
        raise ToolError("--rank truncates: it is only used with --allow-lossy")
    modules, meta = read_adapter(path)
    ckpt = Checkpoint(base) if base else None
    tensors: Dict[str, torch.Tensor] = {}
    report: Dict[str, Dict[str, object]] = {}
    for name, m in progress(sorted(modules.items()), f"convert for {target}"):
        w0 = None
        if ckpt is not None:
            t = ckpt.resolve(name)
            if t is None:
                raise ToolError(f"{path}: module {name} has no layer in {base}")
            w0 = ckpt.weight(t)
            m = m.fit(w0.shape)
        try:
            new, what, err, norm = convert_module(m, target, w0, rank, allow_lossy, dtype)
        except (sp.ShapeUnknown, ToolError) as e:
            raise ToolError(f"{path}: {e}") from None
        tensors.update(module_tensors(name, new))
        report[name] = {"algo": m.algo, "action": what, "relative_error": err,
                        "norm": m.norm() if norm is None else norm}
    meta = dict(meta)
    meta["lycoris_kohya_converted_for"] = target
    save_adapter(out, tensors, meta)
    n2 = sum(r["norm"] ** 2 for r in report.values())
    e2 = sum((r["relative_error"] * r["norm"]) ** 2 for r in report.values())
    return {"file": path, "for": target, "out": out, "modules": report,
            "total_relative_error": math.sqrt(e2 / n2) if n2 > 0 else 0.0}


def run(args) -> int:
    r = convert(args.file, args.target, args.out, args.base, args.allow_lossy, args.rank, parse_dtype(args.dtype))
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    actions: Dict[str, int] = {}
    for e in r["modules"].values():
        key = e["action"].split(" rank ")[0] if "LoCon rank" in e["action"] else e["action"]
        actions[key] = actions.get(key, 0) + 1
    for what, n in actions.items():
        print(f"{n:>5} modules: {what}")
    worst = max(r["modules"].items(), key=lambda kv: kv[1]["relative_error"])
    print(f"largest relative error {worst[1]['relative_error']:.3e} ({worst[0]}); "
          f"total {r['total_relative_error']:.3e} -> {r['out']} (for {r['for']})")
    return 0
