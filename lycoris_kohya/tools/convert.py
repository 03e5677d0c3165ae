"""``lycoris-kohya convert FILE --for comfyui|a1111|diffusers|musubi|all --out OUT [--base MODEL]``: rewrite a
file into a layout the target applies exactly as trained."""
from __future__ import annotations

import json
import math
from typing import Dict, Optional, Tuple

import torch

from .. import specs as sp
from ..algos import dora as dora_math
from ..algos import locon, lokr
from . import comfy_fused, lowrank, musubi
from .checkpoint import Checkpoint, dtype_name, parse_dtype
from .common import (ToolError, UsageError, check_input, check_output, check_rank, module_tensors, over_base, progress,
                     read_adapter, save_adapter, short, summary, tool_metadata, true_rank, written)

TARGETS = ("comfyui", "a1111", "diffusers", "musubi", "all")
HELP = "rewrite a file so that a UI or library applies it exactly as trained"
DESCRIPTION = HELP + """. comfyui: LoKr Tucker (lokr_t2, which ComfyUI skips silently) folded into a
full lokr_w2; output-axis DoRA (ComfyUI divides by ||W0||) written as the full weight difference
W_d - W0 (a "diff" tensor: W = W0 + m*diff is exact at every strength, since W_d - W0 is linear in m).
Z-Image and HunyuanVideo 1.5 files for comfyui: each attention's q/k/v written as one module of
ComfyUI's fused qkv (stacked exactly; LoKr, DoRA and Tucker parts as a LoCon of the stacked change at
full numerical rank), the other layers under ComfyUI's names. a1111: output-axis DoRA (not implemented there) as "diff". diffusers and all (one file every target
applies: plain LoCon): Tucker LoCon folded exactly; LoHa, LoKr and DoRA (as W_d - W0) factorised by SVD
at their full numerical rank (exact up to float rounding, measured and reported). musubi (its
inference merge reads one algorithm per file, no DoRA, no Tucker, LoHa/LoKr on Linears only, LoKr
with a full lokr_w1): a file of one algorithm it reads is kept (lora_mid folded, lokr_w1_a/b
multiplied out, both exact), any other becomes plain LoCon as for diffusers. DoRA to "diff" or
LoCon needs the base model (--base). What cannot be written exactly is refused with the reason; with
--allow-lossy --rank R it is truncated to rank R and the error reported. A module whose g*dW is
exactly zero (a layer the training never changed) that has to become LoCon is written as a rank-1
LoCon with lora_up = 0. OUT must not exist (--force replaces it) and is never the input."""
KEPT = "unchanged"
ZERO_HOW = "kept as they are, or (as LoCon) written as rank-1 LoCon with lora_up = 0"


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=HELP, description=DESCRIPTION)
    p.add_argument("file", help="adapter file")
    p.add_argument("--for", dest="target", required=True, choices=TARGETS, help="the tool that will apply it")
    p.add_argument("--out", required=True, help="output .safetensors (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never the input)")
    p.add_argument("--base", metavar="MODEL", help="base model (diffusers folder with unet/ and text_encoder/, or a "
                   "single-file checkpoint): needed for DoRA conversions and for layer shapes LoHa/LoKr files omit")
    p.add_argument("--allow-lossy", action="store_true", help="allow truncation to --rank (SVD), reporting the error")
    p.add_argument("--rank", type=int, help="with --allow-lossy: the largest rank of LoCon modules written by SVD")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output dtype (default: the input's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per module (default: a summary)")
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


def full_lokr_w1(m: sp.StoredModule) -> Dict[str, torch.Tensor]:
    """LoKr with lokr_w1_a/b -> the same module with a full lokr_w1 = w1_a @ w1_b. The scale stays:
    with a factorised lokr_w2 it is alpha/rank(w2) in every reader; with a full lokr_w2 (where
    alpha/rank(w1) applied) both factors are now full and readers take the scale as 1, so g is
    multiplied into lokr_w2."""
    t = dict(m.factors)
    w1 = (t.pop(lokr.W1A).float() @ t.pop(lokr.W1B).float()).to(m.factors[lokr.W1A].dtype)
    out = {lokr.W1: w1, **t}
    if lokr.W2 in t:
        out[lokr.W2] = (t[lokr.W2].float() * m.scale).to(t[lokr.W2].dtype)
        out["alpha"] = torch.tensor(1.0)
    elif m.alpha is not None:
        out["alpha"] = torch.tensor(m.alpha)
    if m.dora_scale is not None:
        out["dora_scale"] = m.dora_scale
    return out


def _as_locon(d: torch.Tensor, rank: Optional[int], allow_lossy: bool, dtype, name: str,
              bound: Optional[int] = None) -> Tuple[Dict, str, float, float]:
    exact = lowrank.svd_fit(d, None, None, dtype, bound)
    if exact.zero:
        return exact.tensors, "LoCon rank 1 with lora_up = 0 (the module is exactly zero)", 0.0, 0.0
    if rank is None or rank >= exact.rank:
        return exact.tensors, f"LoCon rank {exact.rank} (full numerical rank)", exact.relative_error, exact.norm
    if not allow_lossy:
        raise UsageError(f"{name}: needs rank {exact.rank} to be exact; --rank {rank} truncates it: add --allow-lossy")
    f = lowrank.svd_fit(d, rank, None, dtype, bound)
    return f.tensors, f"LoCon rank {f.rank} (truncated from {exact.rank})", f.relative_error, f.norm


def convert_module(m: sp.StoredModule, target: str, w0: Optional[torch.Tensor], rank: Optional[int],
                   allow_lossy: bool, dtype: Optional[torch.dtype]) -> Tuple[Dict[str, torch.Tensor], str, float, float]:
    """(tensors, what was done, relative error, ||what the error is relative to||) for one module."""
    dt = dtype or next(iter(m.factors.values())).dtype

    def cast(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: (v if k == "dora_scale" else v.to(dt)) for k, v in t.items()}

    # LoKr with both factors full: g = 1 whatever alpha is. Kept, it is written with alpha 1, which
    # every reader takes as g = 1, also one that applies alpha there (ComfyUI #15114)
    alpha_to_one = (m.algo == "lokr" and m.layout is not None and not m.layout.use_alpha
                    and m.alpha not in (None, 1.0))

    def unchanged() -> Dict[str, torch.Tensor]:
        t = dict(m.factors)
        if m.alpha is not None:
            t["alpha"] = torch.tensor(1.0 if alpha_to_one else m.alpha)
        if m.dora_scale is not None:
            t["dora_scale"] = m.dora_scale
        return cast(t)

    def kept() -> Tuple[Dict[str, torch.Tensor], str, float, None]:
        return unchanged(), f"alpha {m.alpha:g} -> 1 (both LoKr factors full)" if alpha_to_one else KEPT, 0.0, None

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
        return kept()
    if target == "musubi":  # a file musubi reads as it is (convert() turns any other into "all")
        if m.algo == "lokr" and lokr.W1 not in m.factors:
            return cast(full_lokr_w1(m)), "lokr_w1_a/b multiplied out into a full lokr_w1", 0.0, None
        if m.algo != "locon":
            return kept()
        target = "all"  # LoCon: lora_mid folded as for diffusers
    # diffusers / all: plain LoCon only
    if m.dora_axis is not None:
        d = m.change(base_needed("DoRA as LoCon"), 1.0)
        t, what, err, norm = _as_locon(d, rank, allow_lossy, dt, m.name)
        return t, f"{m.dora_axis}-axis DoRA (W_d - W0) -> {what}", err, norm
    if m.algo == "locon":
        if locon.MID in m.factors:
            return cast(lowrank.fold_tucker(unchanged(), m.weight_shape)), "lora_mid folded into lora_down", 0.0, None
        return kept()
    t, what, err, norm = _as_locon(m.delta(), rank, allow_lossy, dt, m.name, m.rank_bound)
    return t, f"{m.algo} -> {what}", err, norm


def _row(algo: str, what: str, err: float, norm: float, rank_in: Optional[int]) -> Dict[str, object]:
    """One module's line of the report (a zero module's input rank is 0)."""
    return {"algo": algo, "action": what, "relative_error": err, "norm": norm, "zero": norm == 0.0,
            "rank_in": 0 if norm == 0.0 else rank_in}


def convert(path: str, target: str, out: str, base: Optional[str] = None, allow_lossy: bool = False,
            rank: Optional[int] = None, dtype: Optional[torch.dtype] = None, force: bool = False) -> Dict:
    if target not in TARGETS:
        raise UsageError(f"--for {target!r}: expected one of {', '.join(TARGETS)}")
    check_rank(rank)
    if rank is not None and not allow_lossy:
        raise UsageError("--rank truncates: it is only used with --allow-lossy")
    check_input(path)
    check_output(out, [path, base], force)
    modules, meta = read_adapter(path)
    ckpt = Checkpoint(base) if base else None
    tensors: Dict[str, torch.Tensor] = {}
    report: Dict[str, Dict[str, object]] = {}
    shapes: Dict[str, tuple] = {}
    fitted = {}
    for name, m in modules.items():
        w0 = None
        if ckpt is not None:
            m, w0 = over_base(path, name, m, ckpt, base)
        fitted[name] = (m, w0)
    per_module = target
    if target == "musubi" and musubi.native({n: m for n, (m, _) in fitted.items()}) is None:
        per_module = "all"  # musubi reads one algorithm per file: every module becomes LoCon
    rename, fused = (lambda n: n), {}
    fusing = comfy_fused.family_of(fitted) if target == "comfyui" else None
    if fusing is not None:  # ComfyUI's model of this family has fused layers (Z-Image, HunyuanVideo 1.5)
        rename, fused = fusing.comfy_name, fusing.triples(fitted)
    in_fused = {n for parts in fused.values() for n in parts.values()}
    for name, (m, w0) in progress(sorted(fitted.items()), f"convert for {target}"):
        if name in in_fused:
            continue
        if m.weight_shape is not None:
            shapes[rename(name)] = m.weight_shape
        try:
            new, what, err, norm = convert_module(m, per_module, w0, rank, allow_lossy, dtype)
        except sp.ShapeUnknown as e:
            raise ToolError(f"{path}: {e}") from None
        except ToolError as e:
            raise type(e)(f"{path}: {e}") from None
        tensors.update(module_tensors(rename(name), new))
        norm = m.norm() if norm is None else norm
        report[rename(name)] = _row(m.algo, what, err, norm, None if m.algo == sp.DIFF else true_rank(m))
    for name, names in fused.items():
        parts = {c: fitted[n][0] for c, n in names.items()}
        try:
            new, what, err, norm = comfy_fused.fuse(parts, {c: fitted[n][1] for c, n in names.items()}, dtype,
                                               lambda d, dt, n: _as_locon(d, rank, allow_lossy, dt, n))
        except ToolError as e:
            raise type(e)(f"{path}: {e}") from None
        tensors.update(module_tensors(name, new))
        norm = math.sqrt(sum(p.norm() ** 2 for p in parts.values())) if norm is None else norm
        report[name] = _row("+".join(sorted({p.algo for p in parts.values()})), what, err, norm,
                            sum(true_rank(p) for p in parts.values()))
    written_modules = sp.read_modules(tensors, shapes)
    for name, w in written_modules.items():  # the rank g*dW has now (None for a full difference)
        report[name]["rank"] = None if w.algo == sp.DIFF else true_rank(w)
    args = [short(path), "--for", target] + (["--base", short(base)] if base else []) \
        + (["--allow-lossy"] if allow_lossy else []) + (["--rank", rank] if rank is not None else []) \
        + (["--dtype", dtype_name(dtype)] if dtype is not None else [])
    n2 = sum(r["norm"] ** 2 for r in report.values())
    e2 = sum((r["relative_error"] * r["norm"]) ** 2 for r in report.values())
    total = math.sqrt(e2 / n2) if n2 > 0 else 0.0
    changed = any(r["action"] != KEPT for r in report.values())
    meta = tool_metadata(written_modules, meta, "convert", args, refactorised=changed,
                         extra={"for": target, "total_relative_error": total})
    save_adapter(out, tensors, meta)
    return {"file": path, "for": target, "out": out, "modules": report, "total_relative_error": total,
            "summary": summary(report)}


def run(args) -> int:
    r = convert(args.file, args.target, args.out, args.base, args.allow_lossy, args.rank, parse_dtype(args.dtype),
                args.force)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if args.verbose:
        for name, e in r["modules"].items():
            err = f" (rel. error {e['relative_error']:.3e})" if e["relative_error"] else ""
            print(f"{name:<72} {e['action']}{err}")
    actions: Dict[str, int] = {}
    for e in r["modules"].values():
        key = e["action"].split(" rank ")[0] if "LoCon rank" in e["action"] and "exactly zero" not in e["action"] \
            else e["action"]
        actions[key] = actions.get(key, 0) + 1
    print(f"convert {r['file']} for {r['for']}:")
    for what, n in actions.items():
        print(f"  {n:>5} modules: {what}")
    s = r["summary"]
    print(f"  relative error: max {s['max_relative_error']:.3e}"
          + (f" ({s['worst_module']})" if s["max_relative_error"] > 0 else "")
          + f", mean {s['mean_relative_error']:.3e}, total {r['total_relative_error']:.3e}")
    if s["zero_modules"]:
        print(f"  {len(s['zero_modules'])} modules are exactly zero (g*dW = 0, layers the training never changed, "
              f"e.g. {s['zero_modules'][0]}): {ZERO_HOW}")
    print(written(r["out"]))
    return 0
