"""``lycoris-kohya resize FILE --rank R [--dynamic METHOD X] --out OUT [--base MODEL]``: any file to a
LoCon of rank <= R by truncated SVD of each module's ``g*dW``."""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional

import torch

from .. import specs as sp
from . import lowrank
from .checkpoint import Checkpoint, dtype_name, parse_dtype
from .common import (ToolError, UsageError, check_input, check_output, check_rank, module_tensors, over_base, progress,
                     read_adapter, save_adapter, short, summary, summary_lines, tool_metadata, true_rank, written)

HELP = "any file (LoCon, LoHa, LoKr, DoRA) to a LoCon of rank <= R by truncated SVD"
DESCRIPTION = HELP + """. Each module's g*dW (from the algorithm's own math) is factorised; a LoCon
module already at rank <= R is kept as it is. kxk convolutions stored with Tucker (lora_mid, hada_t1/t2,
lokr_t2) stay Tucker (truncated HOSVD) unless --no-tucker. DoRA: with --base, the full change W_d - W0
of the base model is factorised into a plain LoCon (it is linear in the multiplier, so the result is
exact at every strength up to the truncation); without --base, dora_scale is kept and g*dW, the
direction's update, is factorised. The relative error ||D - D_r||_F / ||D||_F is measured on the
tensors as written, per module and in total. A module whose g*dW is exactly zero (a layer the training
never changed, e.g. SDXL's unused last layer of text encoder 1) is written as a rank-1 LoCon with
lora_up = 0. LoHa and LoKr files store some layers as [out, in*k*k] without saying Linear or
convolution: give --base for those. OUT must not exist (--force replaces it) and is never the input."""
ZERO_HOW = "written as rank-1 LoCon with lora_up = 0 (finite, no change)"


def add_parser(sub) -> None:
    p = sub.add_parser("resize", help=HELP, description=DESCRIPTION)
    p.add_argument("file", help="adapter file")
    p.add_argument("--rank", type=int, required=True, help="largest rank of the output")
    p.add_argument("--dynamic", nargs=2, metavar=("METHOD", "X"),
                   help="choose each module's rank (<= R) from its singular values: sv_ratio X (keep s >= s_max/X), "
                        "sv_fro X (smallest rank keeping X of the Frobenius norm), sv_cumulative X (of the sum of s)")
    p.add_argument("--out", required=True, help="output .safetensors (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never the input)")
    p.add_argument("--base", metavar="MODEL", help="base model (diffusers folder or single file): layer shapes, "
                   "and DoRA baked as W_d - W0")
    p.add_argument("--no-tucker", action="store_true", help="write plain LoCon for every kxk convolution")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output dtype (default: the input's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per module (default: a summary)")
    p.set_defaults(run=run)


def _dynamic(args):
    if args.dynamic is None:
        return None
    method, x = args.dynamic
    try:
        value = float(x)
    except ValueError:
        raise UsageError(f"--dynamic {method} {x!r}: not a number") from None
    try:
        lowrank.check_dynamic(method, value)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return method, value


def resize(path: str, rank: int, out: str, dynamic=None, base: Optional[str] = None, tucker: bool = True,
           dtype: Optional[torch.dtype] = None, force: bool = False) -> Dict[str, object]:
    check_rank(rank)
    if dynamic is not None:
        try:
            lowrank.check_dynamic(*dynamic)
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_input(path)
    check_output(out, [path, base], force)
    modules, meta = read_adapter(path)
    ckpt = Checkpoint(base) if base else None
    tensors: Dict[str, torch.Tensor] = {}
    report: Dict[str, Dict[str, object]] = {}
    shapes: Dict[str, tuple] = {}
    dora_mode = None
    for name, m in progress(sorted(modules.items()), "resize"):
        w0 = None
        if ckpt is not None:
            m, w0 = over_base(path, name, m, ckpt, base)
        if m.weight_shape is not None:
            shapes[name] = m.weight_shape
        out_dtype = dtype or next(iter(m.factors.values())).dtype
        rank_in = true_rank(m)
        try:
            if m.algo == "locon" and m.rank <= rank and dynamic is None and (m.dora_axis is None or w0 is None):
                kept = {k: v.to(out_dtype) for k, v in m.factors.items()}
                if m.alpha is not None:
                    kept["alpha"] = torch.tensor(m.alpha).to(out_dtype)
                if m.dora_scale is not None:
                    kept["dora_scale"] = m.dora_scale
                tensors.update(module_tensors(name, kept))
                norm = m.norm()
                report[name] = {"algo": m.algo, "rank_in": 0 if norm == 0.0 else rank_in, "rank": m.rank,
                                "error": 0.0, "norm": norm, "relative_error": 0.0, "zero": norm == 0.0, "kept": True}
                continue
            bound = m.rank_bound
            if m.dora_axis is not None and w0 is not None:
                d, dora_mode = m.change(w0, 1.0), "W_d - W0 of the base model, as plain LoCon"
                bound = None
            else:
                d = m.delta()
                if m.dora_axis is not None:
                    dora_mode = "dora_scale kept, g*dW factorised"
        except sp.ShapeUnknown as e:
            raise ToolError(f"{path}: {e}") from None
        f = lowrank.fit(d, rank, dynamic, tucker and m.tucker, out_dtype, bound)
        new = dict(f.tensors)
        if m.dora_axis is not None and w0 is None:
            new["dora_scale"] = m.dora_scale
        tensors.update(module_tensors(name, new))
        report[name] = {"algo": m.algo, "rank_in": 0 if f.zero else rank_in, "rank": f.rank, "error": f.error,
                        "norm": f.norm, "relative_error": f.relative_error, "numerical_rank": f.numerical_rank,
                        "zero": f.zero}
    err2 = sum(r["error"] ** 2 for r in report.values())
    norm2 = sum(r["norm"] ** 2 for r in report.values())
    total = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    written_modules = sp.read_modules(tensors, shapes)
    args: List[object] = [short(path), "--rank", rank]
    if dynamic:
        args += ["--dynamic", dynamic[0], f"{dynamic[1]:g}"]
    if base:
        args += ["--base", short(base)]
    if not tucker:
        args.append("--no-tucker")
    if dtype is not None:
        args += ["--dtype", dtype_name(dtype)]
    meta = tool_metadata(written_modules, meta, "resize", args, dynamic=dynamic is not None,
                         extra={"rank": rank, "dynamic": list(dynamic) if dynamic else None,
                                "total_relative_error": total})
    save_adapter(out, tensors, meta)
    return {"file": path, "out": out, "modules": report, "total_relative_error": total, "dora": dora_mode,
            "summary": summary(report)}


def print_report(r: Dict[str, object], as_json: bool, verbose: bool = False) -> None:
    if as_json:
        print(json.dumps(r, indent=1))
        return
    if verbose:
        print(f"{'module':<72}{'algo':>6}{'rank':>11}{'rel. error':>12}")
        for name, e in r["modules"].items():
            print(f"{name:<72}{e['algo']:>6}{e['rank_in']:>5} -> {e['rank']:<3}{e['relative_error']:>12.3e}"
                  + ("  zero" if e.get("zero") else ""))
    s = r["summary"]
    print(f"resize {r['file']}:")
    for line in summary_lines(s, ZERO_HOW):
        print("  " + line)
    kept = sum(1 for e in r["modules"].values() if e.get("kept"))
    if kept:
        print(f"  {kept} LoCon modules already at rank <= R copied as they are")
    if r.get("dora"):
        print(f"  DoRA: {r['dora']}")
    print(f"  total relative error {r['total_relative_error']:.3e}")
    print(written(r["out"]))


def run(args) -> int:
    r = resize(args.file, args.rank, args.out, _dynamic(args), args.base, not args.no_tucker, parse_dtype(args.dtype),
               args.force)
    print_report(r, args.json, args.verbose)
    return 0
