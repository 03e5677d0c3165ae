"""``lycoris-kohya merge FILE[:M] ... (--into MODEL | --rank R) --out OUT``: bake files into a base
model, or combine files into one LoCon."""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Tuple

import torch

from .. import specs as sp
from .._version import __version__
from ..algos import locon
from . import lowrank
from .checkpoint import Checkpoint, dtype_name, parse_dtype
from .common import (ToolError, UsageError, check_input, check_output, check_rank, module_tensors, over_base,
                     parse_file_multiplier, progress, read_adapter, save_adapter, short, summary, summary_lines,
                     tool_metadata, true_rank, written)

HELP = "bake files into a model (diffusers folder or single-file checkpoint), or combine files into one LoCon"
DESCRIPTION = HELP + """. With --into, each FILE is merged at its multiplier M (default 1), in the
order given, each on the weights the previous ones left (as sd-scripts' --network_merge does; for
DoRA the norm includes the earlier files), computed in fp32 and rounded once when saved. The output
has the input's form: a new diffusers folder (everything else copied) or a single file with the
original (ldm) key names. Without --into, LoCon files are combined exactly by concatenating their
ranks (each scaled by M*alpha/rank); anything else (LoHa, LoKr, DoRA, or a --rank to reach) is
summed densely and factorised by SVD at --rank, with the error reported (DoRA needs --base). A
module whose combined change is exactly zero is written as a rank-1 LoCon with lora_up = 0. OUT must
not exist (--force replaces it; an existing folder only if it is a diffusers model) and is never an
input."""
ZERO_HOW = "written as rank-1 LoCon with lora_up = 0 (finite, no change)"


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help=HELP, description=DESCRIPTION)
    p.add_argument("files", nargs="+", metavar="FILE[:M]", help="adapter files, each with an optional multiplier")
    p.add_argument("--into", metavar="MODEL", help="base model to bake into: a diffusers folder or a single-file "
                   "SD1/SD2/SDXL checkpoint")
    p.add_argument("--out", required=True, help="output: a new folder or file (--into), else an adapter .safetensors "
                   "(must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output dtype (default: as stored)")
    p.add_argument("--rank", type=int, help="without --into: factorise the combined change at this rank (SVD)")
    p.add_argument("--base", metavar="MODEL", help="without --into: base model for shapes and DoRA files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per module (default: a summary)")
    p.set_defaults(run=run)


def _file_args(files: List[Tuple[str, float]]) -> List[str]:
    return [short(p) if m == 1.0 else f"{short(p)}:{m:g}" for p, m in files]


# ----- into a model ----------------------------------------------------------------------------------
def merge_into(files: List[Tuple[str, float]], model: str, out: str, dtype: Optional[torch.dtype] = None,
               force: bool = False) -> Dict:
    for path, _ in files:
        check_input(path)
    check_output(out, [p for p, _ in files] + [model], force, kind="model")
    ckpt = Checkpoint(model)
    loaded = []
    for path, m in files:  # read and match every file before computing anything
        modules, _ = read_adapter(path)
        missing = [n for n in modules if ckpt.resolve(n) is None]
        if missing:
            raise ToolError(f"{path}: {len(missing)} of {len(modules)} modules have no layer in {model} "
                            f"(a file for another model?), e.g. {missing[0]}")
        loaded.append((path, m, modules))
    # layer by layer, every file in order in fp32, rounded once: the same as file after file
    plan: Dict[str, List[Tuple[str, float, sp.StoredModule]]] = {}
    for path, m, modules in loaded:
        for name, mod in modules.items():
            plan.setdefault(ckpt.resolve(name), []).append((path, m, mod))
    for target, parts in progress(plan.items(), "merge", len(plan)):
        w = ckpt.weight(target)
        for path, m, mod in parts:
            try:
                w = mod.merged(w, m)
            except ValueError as e:
                raise ToolError(f"{path}: {e} (the layer in {model} is {list(w.shape)})") from None
        ckpt.set_weight(target, w)
    counts = {path: len(modules) for path, _, modules in loaded}
    args = _file_args(files) + ["--into", short(model)] + (["--dtype", dtype_name(dtype)] if dtype else [])
    ckpt.save(out, dtype, {"lycoris_kohya_merged": json.dumps(
        {"plugin_version": __version__, "tool": {"name": "merge", "args": args}}, sort_keys=True)}, force=force)
    return {"into": model, "out": out, "kind": ckpt.kind, "family": ckpt.family, "merged": counts}


# ----- into one LoCon -----------------------------------------------------------------------------
def _scaled_locon(mod: sp.StoredModule, m: float) -> Dict[str, torch.Tensor]:
    t = {k: v.float() for k, v in mod.factors.items()}
    t[locon.UP] = t[locon.UP] * (m * mod.scale)
    return t


def _concat(parts: List[Dict[str, torch.Tensor]], shape) -> Dict[str, torch.Tensor]:
    """Rank concatenation: sum_i up_i @ down_i = [up_1 .. up_n] @ [down_1; ..; down_n]; Tucker
    parts keep Tucker with a block-diagonal core, mixed parts fold their cores into lora_down."""
    if len(parts) > 1 and not all(locon.MID in p for p in parts):
        parts = [lowrank.fold_tucker(p, shape) for p in parts]
    out = {locon.UP: torch.cat([p[locon.UP] for p in parts], 1), locon.DOWN: torch.cat([p[locon.DOWN] for p in parts], 0)}
    if locon.MID in parts[0]:
        r = sum(p[locon.MID].shape[0] for p in parts)
        mid = torch.zeros(r, r, *parts[0][locon.MID].shape[2:])
        i = 0
        for p in parts:
            k = p[locon.MID].shape[0]
            mid[i:i + k, i:i + k] = p[locon.MID]
            i += k
        out[locon.MID] = mid
    out["alpha"] = torch.tensor(float(out[locon.DOWN].shape[0]))  # g = 1: the scales are in lora_up
    return out


def _same_layer(name: str, parts: List[Tuple[str, float, sp.StoredModule]]) -> None:
    """Every file's module of one name changes a layer of one shape (else: a file for another model)."""
    first_path, _, first = parts[0]
    for path, _, mod in parts[1:]:
        a, b = first.weight_shape, mod.weight_shape
        if mod.flat != first.flat or (a is not None and b is not None and a != b):
            sa, sb = list(a or first.flat), list(b or mod.flat)
            raise ToolError(f"{path}: {name} changes a layer of shape {sb}, {first_path} one of {sa} "
                            f"(files for different models?)")


def combine(files: List[Tuple[str, float]], out: str, rank: Optional[int] = None, base: Optional[str] = None,
            dtype: Optional[torch.dtype] = None, force: bool = False) -> Dict:
    check_rank(rank)
    for path, _ in files:
        check_input(path)
    check_output(out, [p for p, _ in files] + [base], force)
    ckpt = Checkpoint(base) if base else None
    loaded = [(p, m, read_adapter(p)[0]) for p, m in files]
    names = sorted({n for _, _, mods in loaded for n in mods})
    exact = rank is None and all(mod.algo == "locon" and mod.dora_axis is None
                                 for _, _, mods in loaded for mod in mods.values())
    if rank is None and not exact:
        bad = next(f"{p}: {n} ({mod.algo}{', DoRA' if mod.dora_axis else ''})" for p, _, mods in loaded
                   for n, mod in mods.items() if mod.algo != "locon" or mod.dora_axis)
        raise ToolError(f"only LoCon files without DoRA combine exactly; {bad} needs --rank R (SVD)")
    out_dtype = dtype or next(iter(next(iter(loaded[0][2].values())).factors.values())).dtype
    tensors: Dict[str, torch.Tensor] = {}
    report: Dict[str, Dict[str, object]] = {}
    shapes: Dict[str, tuple] = {}
    for name in progress(names, "combine"):
        parts = [(p, m, mods[name]) for p, m, mods in loaded if name in mods]
        w0 = None
        if ckpt is not None:
            fitted = []
            for p, m, mod in parts:
                mod, w0 = over_base(p, name, mod, ckpt, base)
                fitted.append((p, m, mod))
            parts = fitted
        _same_layer(name, parts)
        shape = next((mod.weight_shape for _, _, mod in parts if mod.weight_shape is not None), None)
        if shape is not None:
            shapes[name] = shape
        rank_in = min(sum(true_rank(mod) for _, _, mod in parts), *parts[0][2].flat)
        if exact:
            t = _concat([_scaled_locon(mod, m) for _, m, mod in parts], shape)
            tensors.update(module_tensors(name, {k: v.to(out_dtype) for k, v in t.items()}))
            zero = not any(bool(mod.factors[locon.UP].any()) and m != 0 for _, m, mod in parts)
            report[name] = {"rank_in": 0 if zero else rank_in, "rank": int(t[locon.DOWN].shape[0]),
                            "relative_error": 0.0, "error": 0.0, "norm": 0.0, "zero": zero}
            continue
        if any(mod.dora_axis for _, _, mod in parts):
            if w0 is None:
                p = next(p for p, _, mod in parts if mod.dora_axis)
                raise ToolError(f"{p}: {name} is a DoRA module, whose change depends on the base weight; "
                                f"give --base MODEL")
            w = w0
            for p, m, mod in parts:
                w = mod.merged(w, m)
            d, bound = w - w0, None
        else:
            d = 0
            bounds = []
            for p, m, mod in parts:
                try:
                    d = d + m * mod.delta()
                except sp.ShapeUnknown as e:
                    raise ToolError(f"{p}: {e}") from None
                bounds.append(mod.rank_bound)
            bound = None if None in bounds else sum(bounds)
        f = lowrank.svd_fit(d, rank, None, out_dtype, bound)
        tensors.update(module_tensors(name, f.tensors))
        report[name] = {"rank_in": 0 if f.zero else rank_in, "rank": f.rank, "relative_error": f.relative_error,
                        "error": f.error, "norm": f.norm, "numerical_rank": f.numerical_rank, "zero": f.zero}
    err2 = sum(r["error"] ** 2 for r in report.values())
    norm2 = sum(r["norm"] ** 2 for r in report.values())
    total = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    args = _file_args(files) + (["--rank", rank] if rank is not None else []) \
        + (["--base", short(base)] if base else []) + (["--dtype", dtype_name(dtype)] if dtype else [])
    meta = tool_metadata(sp.read_modules(tensors, shapes), read_adapter(files[0][0])[1], "merge", args,
                         extra={"files": [[short(p), m] for p, m in files], "rank": rank,
                                "total_relative_error": total})
    save_adapter(out, tensors, meta)
    return {"out": out, "exact": exact, "modules": report, "total_relative_error": total, "summary": summary(report)}


def run(args) -> int:
    files = [parse_file_multiplier(f) for f in args.files]
    dtype = parse_dtype(args.dtype)
    if args.into:
        if args.rank is not None or args.base is not None:
            raise UsageError("--rank and --base are for combining files into one LoCon (without --into)")
        r = merge_into(files, args.into, args.out, dtype, args.force)
        if args.json:
            print(json.dumps(r, indent=1))
        else:
            for path, n in r["merged"].items():
                print(f"merged {n} modules of {path}")
            print(f"{written(r['out'])}: {r['family']} {r['kind']}")
        return 0
    r = combine(files, args.out, args.rank, args.base, dtype, args.force)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if args.verbose:
        for name, e in r["modules"].items():
            zero = "  zero" if e["zero"] else ""
            print(f"{name:<72} rank {e['rank']:<4} rel. error {e['relative_error']:.3e}{zero}")
    print(f"merge {len(files)} files into one LoCon, "
          + ("exactly by rank concatenation:" if r["exact"] else f"by SVD at rank <= {args.rank}:"))
    lines = summary_lines(r["summary"], ZERO_HOW if not r["exact"] else "concatenated as they are (finite, no change)")
    for line in (lines[:1] + lines[2:] if r["exact"] else lines):  # exact: no error to report
        print("  " + line)
    if not r["exact"]:
        print(f"  total relative error {r['total_relative_error']:.3e}")
    print(written(r["out"]))
    return 0
