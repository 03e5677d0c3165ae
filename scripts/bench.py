#!/usr/bin/env python
"""Seconds per training step (forward + backward + AdamW step) and peak memory of a UNet with an
adapter network, as ratios against baselines measured in the same run (each measurement in a fresh
child process, so its peak resident memory -- or peak CUDA memory on a GPU -- is its own):

  base      the frozen UNet alone (forward + backward to the input)
  lycoris   lycoris-lora's network with the same algorithm, targets, rank and options (if importable)
  kohya     sd-scripts' networks.lora (LoCon only; if sd-scripts is on PYTHONPATH)

    python scripts/bench.py --algos locon,loha,lokr --steps 10
    PYTHONPATH=$SD_SCRIPTS python scripts/bench.py --dora      # in an env with lycoris-lora installed

Timings are medians over --steps after --warmup steps, on whatever device --device names. The UNet is a
diffusers UNet2DConditionModel sized by --channels; nothing is downloaded.
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

LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def make_unet(channels, cross_dim, seed=0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, cross_attention_dim=cross_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), norm_num_groups=32, sample_size=32,
    )
    return unet.requires_grad_(False).train()


def make_text_encoder(width):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).requires_grad_(False)


def time_steps(step, n, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_network(kind, algo, args, net_args):
    """Median seconds per step for one network implementation (None for the frozen base)."""
    import torch

    unet = make_unet(args.channels, args.cross_dim).to(args.device)
    te = make_text_encoder(args.cross_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.res, args.res, generator=g).to(args.device)
    enc = torch.randn(args.batch, 77, args.cross_dim, generator=g).to(args.device)
    t = torch.tensor([500] * args.batch, device=args.device)

    params = None
    if kind == "ours":
        import lycoris_kohya

        net = lycoris_kohya.create_network(1.0, args.dim, args.alpha, None, te, unet, algo=algo, **net_args)
    elif kind == "lycoris":
        from lycoris.kohya import create_network

        preset = os.path.join(tempfile.mkdtemp(), "preset.toml")
        with open(preset, "w") as f:
            f.write(LYCORIS_PRESET)
        extra = {k: str(v) for k, v in net_args.items()}
        if "dora_wd" in extra:
            extra["wd_on_output"] = "False"  # the same (input) axis as ours
        net = create_network(1.0, args.dim, args.alpha, None, te, unet, algo=algo, preset=preset, **extra)
    elif kind == "kohya":
        from networks.lora import create_network

        net = create_network(1.0, args.dim, args.alpha, None, te, unet, conv_dim=net_args.get("conv_dim"),
                             conv_alpha=net_args.get("conv_alpha"))
    if kind != "base":
        net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
        net.to(args.device)
        params, _ = net.prepare_optimizer_params(None, 1e-4, 1e-4) if kind != "kohya" else \
            net.prepare_optimizer_params(None, 1e-4, 1e-4)
        opt = torch.optim.AdamW(params, lr=1e-4)
        net.train()
        inp = x
    else:
        inp = x.clone().requires_grad_(True)
        opt = None

    def step():
        out = unet(inp, t, enc).sample
        out.float().square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    return time_steps(step, args.steps, args.warmup)


def _child(conn, kind, algo, args, net_args):
    import resource

    import torch

    t = bench_network(kind, algo, args, net_args)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    conn.send((t, peak))
    conn.close()


def measure(kind, algo, args, net_args):
    """(seconds per step, peak MiB) of one network, in a fresh process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, kind, algo, args, net_args))
    p.start()
    result = parent.recv()
    p.join()
    return result


def importable(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default="locon,loha,lokr")
    p.add_argument("--dora", action="store_true", help="also each algorithm with dora_wd=True")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--channels", default="64,128", help="UNet block_out_channels")
    p.add_argument("--cross_dim", type=int, default=64)
    p.add_argument("--res", type=int, default=32, help="latent size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.channels = tuple(int(c) for c in args.channels.split(","))

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    have_lycoris, have_kohya = importable("lycoris.kohya"), importable("networks.lora")
    print(f"UNet {args.channels}, latent {args.res}x{args.res}, batch {args.batch}, rank {args.dim}, device "
          f"{args.device}; lycoris-lora: {'yes' if have_lycoris else 'not installed'}, "
          f"kohya networks.lora: {'yes' if have_kohya else 'not on PYTHONPATH'}")
    base, base_mem = measure("base", None, args, {})
    unit = "MiB CUDA" if args.device.startswith("cuda") else "MiB RSS"
    print(f"{'network':28s} {'s/step':>8s} {'x base':>7s} {'peak ' + unit:>14s} {'x base':>7s} {'x lycoris (time, memory)':>26s}")
    print(f"{'frozen base':28s} {base:8.4f} {1.0:7.2f} {base_mem:14.0f} {1.0:7.2f}")
    conv = {"conv_dim": args.dim, "conv_alpha": args.alpha}
    rows = [(a, {}) for a in args.algos.split(",")]
    if args.dora:
        rows += [(a, {"dora_wd": True}) for a in args.algos.split(",")]
    def row(label, t, mem):
        return f"{label:28s} {t:8.4f} {t / base:7.2f} {mem:14.0f} {mem / base_mem:7.2f}"

    if have_kohya:
        print(row("kohya networks.lora", *measure("kohya", "locon", args, conv)), flush=True)
    for algo, extra in rows:
        net_args = {**conv, **extra}
        label = algo + (" + DoRA" if extra else "")
        ours, mem = measure("ours", algo, args, net_args)
        line = row("lycoris_kohya " + label, ours, mem)
        if have_lycoris:
            theirs, their_mem = measure("lycoris", algo, args, net_args)
            line += (f"   {ours / theirs:5.2f}, {mem / their_mem:5.2f}"
                     f"   (lycoris-lora: {theirs:.4f} s, {their_mem:.0f} MiB)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
