#!/usr/bin/env python
"""Seconds per training step (forward + backward + AdamW step) and peak memory of a U-Net with an
adapter network, on real layer shapes, as ratios against baselines measured in the same run. Every
configuration runs in a fresh child process (its peak resident memory, or peak CUDA memory, is its
own, read before anything else is built). Its speed is compared with a floor measured in the same
process: after its own steps, a second, identical frozen U-Net is built and the two alternate step
by step, so that machine drift (the floor alone moved by 30-45% within one run on a shared 2-core
machine, and by 2x between neighbouring seconds) hits both sides of each ratio alike.

  floor     the frozen U-Net alone: forward + backward to its input
  kohya     sd-scripts' networks.lora on the same modules (LoCon rows; sd-scripts on PYTHONPATH)
  lycoris   lycoris-lora with the same algorithm, modules, rank and options (if installed)

    python scripts/bench.py --shape sd15 --latent 8,32            # the README's table
    python scripts/bench.py --shape sdxl --latent 16 --only locon,lokr_dora
    python scripts/bench.py --shape flux --latent 1024,4096                # DiT mode: image tokens
    PYTHONPATH=$SD_SCRIPTS python scripts/bench.py ...             # adds networks.lora and, where
                                                                   # installed, lycoris-lora

Shapes: sd15 = diffusers UNet2DConditionModel with SD1.5's config (320/640/1280/1280, 2 layers per
block, cross-attention 768, head dim 8); sdxl = SDXL's (320/640/1280, 1/2/10 transformer layers,
cross-attention 2048, text_time embedding); toy = 64/128, one layer per block; flux = FLUX.1-dev's
adapted Linears of one double and one single block at width 3072 / MLP 12288 (scripts/flux_blocks.py;
--latent is then the number of image tokens, beside --txt-tokens text tokens), flux-small the same at
256 / 1024. --fp8-base stores the frozen weights as float8_e4m3fn, as sd-scripts' --fp8_base does,
and runs the steps under bf16 autocast. Random weights, nothing downloaded. Configurations: rank 8, alpha 4, preset attn-mlp (the transformer blocks) unless
the row says otherwise; batch 1; AdamW.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (our network_args, comparable to lycoris-lora?, comparable to kohya networks.lora?)
CONFIGS = {
    "locon": ({"algo": "locon"}, True, True),
    "locon_conv": ({"algo": "locon", "preset": "default", "conv_dim": 8, "conv_alpha": 4}, True, True),
    "locon_conv_tucker": ({"algo": "locon", "preset": "default", "conv_dim": 8, "conv_alpha": 4, "use_tucker": True}, True, False),
    "loha": ({"algo": "loha"}, True, False),
    "loha_conv_tucker": ({"algo": "loha", "preset": "default", "conv_dim": 8, "conv_alpha": 4, "use_tucker": True}, True, False),
    "lokr": ({"algo": "lokr"}, True, False),
    "lokr_conv": ({"algo": "lokr", "preset": "default", "conv_dim": 8, "conv_alpha": 4}, True, False),
    "locon_dora": ({"algo": "locon", "dora_wd": True}, True, False),
    "locon_dora_out": ({"algo": "locon", "dora_wd": True, "wd_on_output": True}, True, False),
    "locon_dora_detach": ({"algo": "locon", "dora_wd": True, "dora_detach_norm": True}, False, False),
    "lokr_dora_detach": ({"algo": "lokr", "dora_wd": True, "dora_detach_norm": True}, False, False),
    "loha_dora": ({"algo": "loha", "dora_wd": True}, True, False),
    "loha_dora_out": ({"algo": "loha", "dora_wd": True, "wd_on_output": True}, True, False),
    "lokr_dora": ({"algo": "lokr", "dora_wd": True}, True, False),
    "lokr_dora_out": ({"algo": "lokr", "dora_wd": True, "wd_on_output": True}, True, False),
    "locon_dropouts": ({"algo": "locon", "dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1}, True, True),
    "loha_dropouts": ({"algo": "loha", "dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1}, True, False),
    "lokr_maxnorm": ({"algo": "lokr", "scale_weight_norms": 1.0}, True, False),
    "loha_maxnorm": ({"algo": "loha", "scale_weight_norms": 1.0}, True, False),
}
DEFAULT_ROWS = "locon,locon_conv,loha,lokr,locon_dora,loha_dora,lokr_dora,locon_dora_detach"

LYCORIS_PRESETS = {
    "attn-mlp": '''unet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'''
                '''text_encoder_target_module = []\ntext_encoder_target_name = []\n''',
    "default": '''unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'''
               '''unet_target_name = []\ntext_encoder_target_module = []\ntext_encoder_target_name = []\n''',
    "dit": '''unet_target_module = ["DoubleStreamBlock", "SingleStreamBlock"]\nunet_target_name = []\n'''
           '''text_encoder_target_module = []\ntext_encoder_target_name = []\n''',
}

SHAPES = {
    "toy": dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


#: DiT shapes: (hidden width, MLP width) of FLUX.1's blocks (scripts/flux_blocks.py)
DIT_SHAPES = {"flux": (3072, 12288), "flux-small": (256, 1024)}


def make_unet(shape: str, seed: int = 0, fp8: bool = False):
    """The frozen model of a shape (a U-Net, or the DiT blocks), its weights fp8 with ``fp8``."""
    import torch

    torch.manual_seed(seed)
    if shape in DIT_SHAPES:
        from flux_blocks import Flux

        model = Flux(*DIT_SHAPES[shape])
    else:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**SHAPES[shape])
    model.requires_grad_(False).train()
    if fp8:  # sd-scripts' --fp8_base: the frozen weights stored as float8_e4m3fn
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    return model


def inputs(shape: str, latent: int, batch: int, device: str, txt_tokens: int = 512):
    import torch

    g = torch.Generator().manual_seed(1)
    if shape in DIT_SHAPES:  # latent: image tokens
        h = DIT_SHAPES[shape][0]
        return torch.randn(batch, latent, h, generator=g).to(device), None, \
            torch.randn(batch, txt_tokens, h, generator=g).to(device), {}
    cross = SHAPES[shape]["cross_attention_dim"]
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    enc = torch.randn(batch, 77, cross, generator=g).to(device)
    kw = {}
    if shape == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g).to(device),
                                   "time_ids": torch.randn(batch, 6, generator=g).to(device)}
    return x, torch.tensor([500] * batch, device=device), enc, kw


def build(kind: str, config: str, unet, args):
    """The network of one row, applied to the U-Net (None for the floor)."""
    if kind == "floor":
        return None
    net_args = dict(CONFIGS[config][0])
    net_args.pop("scale_weight_norms", None)
    preset = net_args.pop("preset", "attn-mlp")
    if kind == "ours":
        import lycoris_kohya

        net = lycoris_kohya.create_network(1.0, args.dim, args.alpha, None, [], unet, preset=preset,
                                           **{k: str(v) for k, v in net_args.items()})
    elif kind == "lycoris":
        from lycoris.kohya import create_network

        path = os.path.join(tempfile.mkdtemp(), "preset.toml")
        with open(path, "w") as f:
            f.write(LYCORIS_PRESETS["dit" if args.shape in DIT_SHAPES else preset])
        extra = {k: str(v) for k, v in net_args.items() if k != "algo"}
        if "dora_wd" in extra and "wd_on_output" not in extra:
            extra["wd_on_output"] = "False"  # lycoris-lora defaults to the output axis; ours to the input one
        net = create_network(1.0, args.dim, args.alpha, None, [], unet, algo=net_args["algo"], preset=path, **extra)
    elif args.shape in DIT_SHAPES:  # sd-scripts' networks.lora_flux: DoubleStreamBlock, SingleStreamBlock
        from networks.lora_flux import create_network

        net = create_network(1.0, args.dim, args.alpha, None, [], unet, neuron_dropout=net_args.get("dropout"))
    else:  # kohya networks.lora: Transformer2DModel, plus ResNet/samplers with conv_dim
        from networks.lora import create_network

        kw = {}
        if "conv_dim" in net_args:
            kw = {"conv_dim": str(net_args["conv_dim"]), "conv_alpha": str(net_args["conv_alpha"])}
        for k in ("rank_dropout", "module_dropout"):
            if k in net_args:
                kw[k] = str(net_args[k])
        net = create_network(1.0, args.dim, args.alpha, None, [], unet, neuron_dropout=net_args.get("dropout"), **kw)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    net.to(args.device)
    return net


def _peak_memory(device):
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def _stepper(kind, config, args, latent, unet):
    """(step function, modules) of one configuration on this U-Net."""
    import torch

    x, t, enc, kw = inputs(args.shape, latent, args.batch, args.device, args.txt_tokens)
    net = build(kind, config, unet, args)
    max_norm = CONFIGS[config][0].get("scale_weight_norms") if config else None
    if net is None:
        inp, opt, modules = x.clone().requires_grad_(True), None, 0
    else:
        inp = x
        # sd-scripts' networks.lora_flux has only the per-text-encoder spelling
        prepare = getattr(net, "prepare_optimizer_params", None) or net.prepare_optimizer_params_with_multiple_te_lrs
        params, _ = prepare(None, 1e-4, 1e-4)
        opt = torch.optim.AdamW(params, lr=1e-4)
        net.train()
        modules = len(getattr(net, "unet_loras", []))
    model = torch.compile(unet) if args.compile else unet
    dit = args.shape in DIT_SHAPES

    def step():
        t0 = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.fp8_base):
            out = model(inp, enc) if dit else model(inp, t, enc, **kw).sample
        out.float().square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
            if max_norm is not None:
                net.apply_max_norm_regularization(max_norm, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, modules


def run_one(kind, config, args, latent):
    """One configuration, in this process: its warm-up steps alone (first step, peak memory), then, for
    a network, its timed steps alternated with the frozen U-Net's own (a second, identical U-Net built after
    the peak was read), so that each adapter step has a floor step measured seconds from it."""
    import torch

    torch.set_num_threads(args.threads)
    # AdamW's second moments of tiny gradients are denormal floats, which x86 CPUs compute ~100x
    # slower; whichever network has them first would look slow (GPUs flush them anyway)
    torch.set_flush_denormal(True)
    step, modules = _stepper(kind, config, args, latent, make_unet(args.shape, fp8=args.fp8_base).to(args.device))
    first = step()  # the first step compiles under --compile
    for _ in range(args.warmup - 1):
        step()
    # a network's timed steps are the paired ones below: alone it only warms up (its peak is reached
    # by then: the optimizer state exists after the first step)
    alone = [step() for _ in range(args.steps)] if kind == "floor" else []
    peak = _peak_memory(args.device)
    if kind == "floor":
        return {"t": statistics.median(alone), "floor": None, "modules": 0, "first": first, "peak": peak}
    floor_step, _ = _stepper("floor", None, args, latent, make_unet(args.shape, fp8=args.fp8_base).to(args.device))
    for _ in range(args.warmup):
        floor_step()
    pairs = [(floor_step(), step()) for _ in range(args.steps)]
    ratios = sorted(a / f for f, a in pairs)  # each step over the floor step next to it
    return {"t": statistics.median(a for _, a in pairs), "floor": statistics.median(f for f, _ in pairs),
            "x": statistics.median(ratios), "ratios": ratios, "modules": modules, "first": first, "peak": peak}


def _child(conn, kind, config, args, latent):
    if not args.verbose:  # the libraries' logs would interleave with the table
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    try:
        conn.send((run_one(kind, config, args, latent), None))
    except Exception as e:  # reported as a row, not a crash of the whole run
        conn.send((None, f"{type(e).__name__}: {e}"))
    conn.close()


def measure(kind, config, args, latent):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, kind, config, args, latent))
    p.start()
    result = parent.recv()
    p.join()
    return result


def measure_floor(args, latent):
    """The frozen U-Net alone in its own process; a failure stops the run."""
    r, err = measure("floor", None, args, latent)
    if err:
        raise SystemExit(f"floor failed: {err}")
    return r


def importable(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES) + sorted(DIT_SHAPES), default="sd15")
    p.add_argument("--latent", default="8", help="latent sizes, comma-separated (8 = 64 px); DiT shapes: image tokens")
    p.add_argument("--txt-tokens", type=int, default=512, help="DiT shapes: text tokens")
    p.add_argument("--fp8-base", action="store_true", help="frozen weights as float8_e4m3fn (sd-scripts' --fp8_base), "
                   "steps under bf16 autocast")
    p.add_argument("--only", default=DEFAULT_ROWS, help=f"rows, comma-separated, of: {', '.join(CONFIGS)}; 'all'")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps, and alternated floor/network pairs")
    p.add_argument("--warmup", type=int, default=2,
                   help="steps before timing (the first ones are slow: AdamW's state starts at zero, and "
                        "squares of tiny gradients are denormal floats for a step or two)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (as sd-scripts' "
                   "--torch_compile); the 'first step' column is then mostly compile time")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-lycoris", action="store_true", help="skip lycoris-lora even if installed")
    p.add_argument("--verbose", action="store_true", help="let the children print their logs")
    args = p.parse_args(argv)
    rows = list(CONFIGS) if args.only == "all" else args.only.split(",")
    unknown = [r for r in rows if r not in CONFIGS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(CONFIGS)}")
    have_lycoris = importable("lycoris.kohya") and not args.no_lycoris
    have_kohya = importable("networks.lora_flux" if args.shape in DIT_SHAPES else "networks.lora")
    unit = "MiB CUDA" if args.device.startswith("cuda") else "MiB RSS"
    what = f"{args.shape} DiT blocks, {args.txt_tokens} text tokens" if args.shape in DIT_SHAPES else f"{args.shape} U-Net"
    print(f"# {what}{', fp8 base' if args.fp8_base else ''}, batch {args.batch}, rank {args.dim}, alpha {args.alpha:g}, {args.threads} threads, "
          f"device {args.device}; median of {args.steps} steps after {args.warmup} warm-up; "
          f"{'torch.compile; ' if args.compile else ''}"
          f"lycoris-lora: {'yes' if have_lycoris else 'no'}; kohya networks.lora: {'yes' if have_kohya else 'no'}")
    for latent in (int(v) for v in args.latent.split(",")):
        start = measure_floor(args, latent)
        print(f"\n## {'image tokens' if args.shape in DIT_SHAPES else 'latent'} {latent}: floor {start['t']:.3f} s/step at the start, {start['peak']:.0f} {unit}, "
              f"first step {start['first']:.1f} s\n")
        print(f"| network | modules | s/step | floor s/step | x floor | pair ratios min-max | x lycoris (time above floor) "
              f"| peak {unit} | x kohya mem | x lycoris mem | first step s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for config in rows:
            _, lyc_ok, kohya_ok = CONFIGS[config]
            results = {"ours": measure("ours", config, args, latent)}
            if have_kohya and kohya_ok:
                results["kohya"] = measure("kohya", config, args, latent)
            if have_lycoris and lyc_ok:
                results["lycoris"] = measure("lycoris", config, args, latent)
            ok = {k: r for k, (r, err) in results.items() if not err}
            for kind in ("kohya", "ours", "lycoris"):
                if kind not in results:
                    continue
                label = {"ours": "lycoris_kohya", "kohya": "networks.lora", "lycoris": "lycoris-lora"}[kind]
                r, err = results[kind]
                if err:
                    print(f"| {label} {config} | – | failed: {err[:80]} | | | | | | | | |", flush=True)
                    continue
                x = r["x"]
                spread = f"{r['ratios'][0]:.2f}-{r['ratios'][-1]:.2f}"
                over = ""
                if kind == "ours" and "lycoris" in ok:  # in ratios: each process has its own floor
                    over = f"{(x - 1) / max(ok['lycoris']['x'] - 1, 1e-9):.2f}"
                km = f"{r['peak'] / ok['kohya']['peak']:.2f}" if "kohya" in ok else ""
                lm = f"{r['peak'] / ok['lycoris']['peak']:.2f}" if kind == "ours" and "lycoris" in ok else ""
                print(f"| {label} {config} | {r['modules']} | {r['t']:.3f} | {r['floor']:.3f} | {x:.2f} | {spread} | {over} | "
                      f"{r['peak']:.0f} | {km} | {lm} | {r['first']:.1f} |", flush=True)
        end = measure_floor(args, latent)
        print(f"\nfloor alone at the start and end: {start['t']:.3f}, {end['t']:.3f} s/step; x floor is the median "
              f"of each row's step/floor ratios, each step over the floor step alternated with it in the same process")


if __name__ == "__main__":
    main()
