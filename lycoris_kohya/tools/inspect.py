"""``lycoris-kohya inspect FILE [--json] [--plot OUT.png] [--modules]``: what an adapter file holds."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping

from .. import blocks
from .. import specs as sp
from .. import weights as wio
from ..algos import dora as dora_math
from ..algos import locon, lokr
from . import comfy_fused, musubi
from .common import ToolError, UsageError, check_output, load_adapter_file, true_rank, written

HELP = "what an adapter file holds: algorithms, ranks, alphas, DoRA, norms per block, metadata, which UIs apply it"
TRAINING_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                 "ss_v2", "ss_sd_model_name", "ss_output_name", "ss_training_comment")
#: what to do where a reader does not apply a file as trained
FIX = {tool: f"convert --for {target} fixes it" for tool, target in
       (("comfyui", "comfyui"), ("a1111", "a1111"), ("diffusers", "diffusers"), ("sd-scripts", "all"), ("musubi", "musubi"))}
FIX["musubi --lycoris"] = "musubi without --lycoris applies a convert --for musubi file as trained"
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "pgf", "raw", "rgba")


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=HELP, description=HELP + ". The norm of a module is ||g*dW||_F "
                       "(g = alpha/rank), what --scale_weight_norms bounds.")
    p.add_argument("file", help="adapter file (.safetensors)")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"modules": {name: {"algo", "rank", '
                   '"alpha", "dora_axis", "norm"}}, "metadata": {...}, "summary": {...}}')
    p.add_argument("--plot", metavar="OUT.png", help="bar chart of the norm per block (needs matplotlib: "
                   "pip install 'lycoris_kohya[plot]'); OUT.png must not exist, unless --force")
    p.add_argument("--force", action="store_true", help="replace the --plot file if it exists (never the input)")
    p.add_argument("--modules", action="store_true", help="also list every module")
    p.set_defaults(run=run)


def block_of(name: str, is_sdxl: bool) -> str:
    """kohya's block of a module: TE/TE1/TE2, IN00.., MID, OUT00.., or UNET (outside the blocks)."""
    if name.startswith("lora_te"):
        return name.split("_")[1].upper()
    idx = blocks.block_index(name, is_sdxl)
    if is_sdxl:
        if 1 <= idx <= 9:
            return f"IN{idx - 1:02d}"
        if 10 <= idx <= 12:
            return "MID"
        if 13 <= idx <= 21:
            return f"OUT{idx - 13:02d}"
        return "UNET"
    if 1 <= idx <= 11:
        return f"IN{idx:02d}"
    if idx == 12:
        return "MID"
    if 13 <= idx <= 24:
        return f"OUT{idx - 13:02d}"
    return "UNET"


def compatibility(modules: Mapping[str, sp.StoredModule], keys: Iterable[str]) -> Dict[str, Dict[str, object]]:
    """Which tools apply every module as trained (SPEC section 3's consumer facts; musubi-tuner's
    merge: ``tools/musubi.py``). ``keys``: the file's tensor keys."""
    def count(pred) -> int:
        return sum(1 for m in modules.values() if pred(m))

    lokr_t2 = count(lambda m: lokr.T2 in m.factors)
    out_axis = count(lambda m: m.dora_axis == dora_math.OUTPUT)
    dora = count(lambda m: m.dora_axis is not None)
    not_locon = count(lambda m: m.algo not in ("locon",))
    mid = count(lambda m: locon.MID in m.factors)
    fusing = comfy_fused.family_of(modules)
    unfused = fusing.unfused(modules) if fusing else 0
    issues = {
        "comfyui": ([f"finds no layer for {unfused} {fusing.family} modules (its model fuses q/k/v into qkv and "
                     "names some layers differently)"] if unfused else [])
        + ([f"skips {lokr_t2} LoKr Tucker (lokr_t2) modules silently"] if lokr_t2 else [])
        + ([f"{out_axis} output-axis DoRA modules divide by ||W0|| instead of ||W0 + g*dW||"] if out_axis else []),
        "a1111": [f"{out_axis} output-axis DoRA modules: only the input axis is implemented"] if out_axis else [],
        "diffusers": ([f"refuses {not_locon} LoHa/LoKr/diff modules"] if not_locon else [])
        + ([f"refuses {mid} Tucker LoCon (lora_mid) modules"] if mid else [])
        + ([f"drops dora_scale of {dora} DoRA modules"] if dora else []),
        "sd-scripts": ([f"ignores {not_locon} LoHa/LoKr/diff modules"] if not_locon else [])
        + ([f"does not read lora_mid ({mid} modules)"] if mid else [])
        + ([f"fails on dora_scale ({dora} modules)"] if dora else []),
        "musubi": musubi.issues(modules, keys),
        "musubi --lycoris": musubi.lycoris_issues(modules),
    }
    return {tool: {"applies_as_trained": not msgs, "issues": msgs} for tool, msgs in issues.items()}


def _rank(m: sp.StoredModule):
    """The rank shown for a module: the one alpha divides by; for a LoKr whose factors are both full
    (no such rank: alpha is ignored, the layout's placeholder is 1) the rank its g*dW has,
    rank(w1)*rank(w2); None for a full difference."""
    if m.algo == sp.DIFF:
        return None
    return m.rank if m.layout.use_alpha else true_rank(m)


def summarize(path: str) -> Dict[str, object]:
    sd, meta = load_adapter_file(path)
    try:
        modules = sp.read_modules(sd)
    except ValueError as e:
        raise ToolError(f"{path}: {e}") from None
    is_sdxl = blocks.is_sdxl_layout(modules)
    entries: Dict[str, Dict[str, object]] = OrderedDict()
    per_block: Dict[str, List[float]] = OrderedDict()
    for name in sorted(modules, key=lambda n: (not n.startswith("lora_te"), n)):
        m = modules[name]
        norm = m.norm()
        entries[name] = {"algo": m.algo, "rank": _rank(m), "alpha": m.alpha, "dora_axis": m.dora_axis, "norm": norm}
        per_block.setdefault(block_of(name, is_sdxl), []).append(norm)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    hashes = {}
    if "sshs_model_hash" in meta and path.endswith(".safetensors"):
        model_hash, _ = wio.safetensors_hashes(sd, meta)
        hashes = {"sshs_model_hash": meta["sshs_model_hash"], "matches_file": model_hash == meta["sshs_model_hash"]}
    algos: Dict[str, int] = {}
    for m in modules.values():
        key = m.algo + (" tucker" if m.tucker else "") + (f" dora-{m.dora_axis}" if m.dora_axis else "")
        algos[key] = algos.get(key, 0) + 1
    summary = {
        "file": path,
        "n_modules": len(modules),
        "n_text_encoder": sum(1 for n in modules if n.startswith("lora_te")),
        "n_unet": sum(1 for n in modules if n.startswith("lora_unet")),
        "algorithms": algos,
        "ranks": sorted({e["rank"] for e in entries.values() if e["rank"] is not None}),
        "max_ranks": sorted({true_rank(m) for m in modules.values()}),
        "zero_modules": sorted(n for n, e in entries.items() if e["norm"] == 0.0),
        "non_finite": sorted({k.split(".", 1)[0] for k in wio.non_finite(sd)}),
        "alphas": sorted({m.alpha for m in modules.values() if m.alpha is not None}),
        "dtypes": dtypes,
        "parameters": sum(t.numel() for t in sd.values()),
        "blocks": {b: {"modules": len(v), "norm": math.sqrt(sum(x * x for x in v)), "max": max(v)}
                   for b, v in per_block.items()},
        "total_norm": math.sqrt(sum(e["norm"] ** 2 for e in entries.values())),
        "max_norm": max((e["norm"] for e in entries.values()), default=0.0),
        "hash": hashes,
        "compatibility": compatibility(modules, sd.keys()),
    }
    return {"modules": entries, "metadata": dict(meta), "summary": summary}


def _text(report: Dict[str, object], list_modules: bool) -> str:
    s, meta = report["summary"], report["metadata"]
    lines = [f"{s['file']}: {s['n_modules']} modules ({s['n_text_encoder']} text encoder, {s['n_unet']} U-Net), "
             f"{s['parameters']:,} parameters, dtypes {', '.join(s['dtypes'])}",
             "algorithms: " + ", ".join(f"{k} x{v}" for k, v in s["algorithms"].items()),
             f"ranks: {', '.join(map(str, s['ranks']))}; alphas: {', '.join(f'{a:g}' for a in s['alphas']) or 'none (g = 1)'}",
             f"rank of g*dW at most: {', '.join(map(str, s['max_ranks']))}",
             f"||g*dW||_F: total {s['total_norm']:.6g}, max module {s['max_norm']:.6g}",
             "", f"{'block':<8}{'modules':>8}{'norm':>14}{'max':>14}"]
    for b, v in s["blocks"].items():
        lines.append(f"{b:<8}{v['modules']:>8}{v['norm']:>14.6g}{v['max']:>14.6g}")
    if s["non_finite"]:
        lines.append(f"{len(s['non_finite'])} modules hold NaN or Inf (a damaged file, or a diverged training), "
                     f"e.g. {s['non_finite'][0]}")
    if s["zero_modules"]:
        lines.append(f"{len(s['zero_modules'])} modules are exactly zero (g*dW = 0: layers the training never changed, "
                     f"e.g. {s['zero_modules'][0]}); the tools keep them as zero modules")
    lines.append("")
    for tool, c in s["compatibility"].items():
        lines.append(f"{tool + ':':<18}" + ("applies every module as trained" if c["applies_as_trained"] else
                                            "; ".join(c["issues"]) + f" ({FIX[tool]})"))
    if s["hash"]:
        lines.append(f"sshs_model_hash {s['hash']['sshs_model_hash'][:16]}...: "
                     + ("matches the file" if s["hash"]["matches_file"] else "does NOT match the file's data"))
    shown = [k for k in TRAINING_KEYS if k in meta]
    if shown:
        lines.append("")
        lines += [f"{k}: {meta[k]}" for k in shown]
    if list_modules:
        lines += ["", f"{'module':<72}{'algo':>6}{'rank':>6}{'alpha':>9}{'dora':>8}{'norm':>12}"]
        for name, e in report["modules"].items():
            alpha = "-" if e["alpha"] is None else f"{e['alpha']:g}"
            lines.append(f"{name:<72}{e['algo']:>6}{str(e['rank']):>6}{alpha:>9}{e['dora_axis'] or '-':>8}"
                         f"{e['norm']:>12.5g}")
    return "\n".join(lines)


def _plot_format(out: str) -> str:
    fmt = out.rsplit(".", 1)[-1].lower() if "." in out.rsplit("/", 1)[-1] else "png"
    if fmt not in PLOT_FORMATS:
        raise UsageError(f"--plot {out}: .{fmt} is not an image format matplotlib writes (use .png, .svg or .pdf)")
    return fmt


def plot(report: Dict[str, object], out: str) -> None:
    fmt = _plot_format(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolError("--plot needs matplotlib: pip install 'lycoris_kohya[plot]'") from None
    blocks_ = report["summary"]["blocks"]
    names = list(blocks_)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(names)), 4))
    ax.bar(names, [blocks_[b]["norm"] for b in names], label="block ||g*dW||_F")
    ax.plot(names, [blocks_[b]["max"] for b in names], "k.", label="largest module")
    ax.set_ylabel("||g*dW||_F")
    ax.set_title(report["summary"]["file"].rsplit("/", 1)[-1])
    ax.tick_params(axis="x", labelrotation=90)
    ax.legend()
    fig.tight_layout()
    with wio.atomic_target(out) as tmp:
        fig.savefig(tmp, format=fmt)
    plt.close(fig)


def run(args) -> int:
    if args.plot:
        check_output(args.plot, [args.file], args.force, flag="--plot", kind="file")
        _plot_format(args.plot)
    report = summarize(args.file)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_text(report, args.modules))
        if args.plot:
            print(written(args.plot))
    return 0
