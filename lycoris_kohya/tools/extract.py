"""``lycoris-kohya extract --base A --tuned B --rank R --out OUT [--conv-rank R]``: a LoCon approximating
B - A."""
from __future__ import annotations

import json
import math
from typing import Dict, Optional

import torch

from .. import specs as sp
from . import lowrank
from .checkpoint import Checkpoint, dtype_name, parse_dtype
from .common import (ToolError, UsageError, check_output, check_rank, module_tensors, progress, save_adapter, short,
                     summary, summary_lines, tool_metadata, written)

HELP = "a LoCon approximating the difference of two models (tuned - base)"
DESCRIPTION = HELP + """. Both models are diffusers folders or single-file SD1/SD2/SDXL checkpoints
(either kind each). Every Linear and convolution weight of the U-Net and text encoder(s) that differs
gets a module: truncated SVD of (tuned - base) at --rank (kxk convolutions at --conv-rank; 0 leaves
them out), with the relative error ||D - D_r||_F / ||D||_F per module and in total, measured on the
tensors as written. A layer that is identical in both gets no module (counted in the summary). Key
names are sd-scripts' (SDXL: its ldm paths), so the file loads everywhere. OUT must not exist
(--force replaces it) and is never one of the models."""


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help=HELP, description=DESCRIPTION)
    p.add_argument("--base", required=True, metavar="A", help="the original model")
    p.add_argument("--tuned", required=True, metavar="B", help="the fine-tuned model")
    p.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 convolution modules")
    p.add_argument("--conv-rank", type=int, help="rank of kxk convolution modules (default: --rank; 0: none)")
    p.add_argument("--dynamic", nargs=2, metavar=("METHOD", "X"), help="choose ranks (<= R) from the singular "
                   "values, as resize does: sv_ratio / sv_fro / sv_cumulative X")
    p.add_argument("--fast", action="store_true", help="randomized SVD (a sketch of rank+8 with 2 power iterations) "
                   "instead of the exact truncation: much faster on CPUs, slightly larger error (still measured)")
    p.add_argument("--out", required=True, help="output .safetensors (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never a model)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="output dtype (default fp16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per module (default: a summary)")
    p.set_defaults(run=run)


def extract(base: str, tuned: str, rank: int, out: str, conv_rank: Optional[int] = None, dynamic=None,
            dtype: torch.dtype = torch.float16, fast: bool = False, force: bool = False) -> Dict:
    check_rank(rank)
    if fast and dynamic is not None and dynamic[0] != "sv_ratio":
        raise UsageError(f"--dynamic {dynamic[0]} needs the whole spectrum; with --fast only sv_ratio works")
    conv_rank = rank if conv_rank is None else conv_rank
    if conv_rank < 0:
        raise UsageError(f"--conv-rank {conv_rank}: a rank must be >= 0 (0 leaves kxk convolutions out)")
    check_output(out, [base, tuned], force)
    a, b = Checkpoint(base), Checkpoint(tuned)
    if a.family != b.family:
        raise ToolError(f"{base} is {a.family}, {tuned} is {b.family}: not the same kind of model")
    pairs = []
    for name in a.names():
        other = b.resolve(name)
        if other is None:
            continue
        if a.shape(name) != b.shape(other):
            raise ToolError(f"{name}: {base} has shape {list(a.shape(name))}, {tuned} {list(b.shape(other))}")
        pairs.append((name, other))
    if not pairs:
        raise ToolError(f"{base} and {tuned} share no layer")
    tensors: Dict[str, torch.Tensor] = {}
    report: Dict[str, Dict[str, object]] = {}
    unchanged = skipped = 0
    for name, other in progress(pairs, "extract"):
        d = b.weight(other) - a.weight(name)
        if not bool(d.any()):
            unchanged += 1
            continue
        kxk = d.dim() == 4 and tuple(d.shape[2:]) != (1, 1)
        r = conv_rank if kxk else rank
        if r == 0:
            skipped += 1
            continue
        f = lowrank.svd_fit(d, r, dynamic, dtype, rank_bound=r if fast else None, power=2 if fast else 0)
        tensors.update(module_tensors(name, f.tensors))
        report[name] = {"rank_in": f.numerical_rank, "rank": f.rank, "relative_error": f.relative_error,
                        "error": f.error, "norm": f.norm}
    if not report:
        raise ToolError(f"{tuned} does not differ from {base} in any layer extracted")
    err2 = sum(r["error"] ** 2 for r in report.values())
    norm2 = sum(r["norm"] ** 2 for r in report.values())
    total = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    source = {"ss_network_module": "lycoris_kohya"}
    if a.family == "sdxl":
        source["ss_base_model_version"] = "sdxl_base_v1-0"
    args = ["--base", short(base), "--tuned", short(tuned), "--rank", rank, "--conv-rank", conv_rank] \
        + (["--dynamic", dynamic[0], f"{dynamic[1]:g}"] if dynamic else []) + (["--fast"] if fast else []) \
        + ["--dtype", dtype_name(dtype)]
    meta = tool_metadata(sp.read_modules(tensors), source, "extract", args, dynamic=dynamic is not None,
                         extra={"total_relative_error": total})
    save_adapter(out, tensors, meta)
    return {"out": out, "modules": report, "total_relative_error": total, "unchanged_layers": unchanged,
            "left_out_kxk_convs": skipped, "summary": summary(report)}


def run(args) -> int:
    from .resize import _dynamic

    r = extract(args.base, args.tuned, args.rank, args.out, args.conv_rank, _dynamic(args), parse_dtype(args.dtype),
                args.fast, args.force)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if args.verbose:
        for name, e in r["modules"].items():
            print(f"{name:<72} rank {e['rank']:<4} rel. error {e['relative_error']:.3e}")
    print(f"extract {args.tuned} - {args.base}:")
    for line in summary_lines(r["summary"], ""):
        print("  " + line)
    print(f"  total relative error {r['total_relative_error']:.3e}; {r['unchanged_layers']} layers identical "
          f"(no module), {r['left_out_kxk_convs']} kxk convolutions left out (--conv-rank 0)")
    print(written(r["out"]))
    return 0
