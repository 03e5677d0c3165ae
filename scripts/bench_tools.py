#!/usr/bin/env python
"""Sizes and times of ``lycoris-kohya`` on a full-size SD1.5-shaped model (random weights, built
locally: diffusers' UNet2DConditionModel with the SD1.5 config and a 768-wide, 12-layer CLIP text
encoder; nothing is downloaded). Each command runs in a fresh process under /usr/bin/time (wall
seconds, peak RSS). Prints a markdown table.

    PYTHONPATH=$PWD python scripts/bench_tools.py --out /tmp/bench-tools [--skip-extract]
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

NETWORKS = {  # name: (dim, alpha, network args)
    "locon": (16, 8, {"algo": "locon", "conv_dim": "8", "conv_alpha": "4"}),
    "loha": (8, 4, {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}),
    "lokr_tucker": (8, 4, {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2", "use_tucker": "true"}),
    "locon_dora_out": (16, 8, {"algo": "locon", "conv_dim": "8", "conv_alpha": "4", "dora_wd": "true",
                               "wd_on_output": "true"}),
}


def build(out):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import lycoris_kohya
    from ldm_checkpoint import sd1_single

    torch.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(cross_attention_dim=768).eval().requires_grad_(False)  # the SD1.5 config
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    te.eval().requires_grad_(False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"model: unet {n(unet) / 1e6:.0f}M, text encoder {n(te) / 1e6:.0f}M params ({time.time() - t0:.0f}s)")
    folder = os.path.join(out, "sd15")
    unet.to(torch.float16).save_pretrained(os.path.join(folder, "unet"))
    te.to(torch.float16).save_pretrained(os.path.join(folder, "text_encoder"))
    save_file({k: v.half().contiguous() for k, v in sd1_single(unet, te).items()}, os.path.join(out, "sd15.safetensors"))
    unet.float(), te.float()
    for name, (dim, alpha, args) in NETWORKS.items():
        net = lycoris_kohya.create_network(1.0, dim, alpha, None, te, unet, **args)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 0 and "dora_scale" not in str(p.shape):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for a in net.loras:
                if a.dora_axis is not None:
                    a.dora_scale.mul_(1.01)
        net.save_weights(os.path.join(out, f"{name}.safetensors"), torch.float16, {"ss_network_module": "lycoris_kohya"})
        print(f"{name}: {len(net.loras)} modules")
        del net


def timed(cmd, log):
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "lycoris_kohya", *cmd],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    wall, rss = r.stderr.strip().splitlines()[-1].split()
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout[-3000:] + r.stderr[-2000:] + "\n")
    return r.returncode, float(wall), int(rss) / 1024 ** 2


def size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-extract", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not a.skip_build:
        build(a.out)
    o = lambda f: os.path.join(a.out, f)  # noqa: E731
    for f in ("merged.safetensors", "merged_folder"):
        if os.path.isdir(o(f)):
            import shutil

            shutil.rmtree(o(f))
    runs = [
        ("inspect locon", ["inspect", o("locon.safetensors"), "--json"], None),
        ("inspect loha", ["inspect", o("loha.safetensors"), "--json"], None),
        ("resize loha -> 8 (--base single file)", ["resize", o("loha.safetensors"), "--rank", "8", "--base",
                                                   o("sd15.safetensors"), "--out", o("loha_r8.safetensors")],
         o("loha_r8.safetensors")),
        ("resize locon 16 -> 4", ["resize", o("locon.safetensors"), "--rank", "4", "--out", o("locon_r4.safetensors")],
         o("locon_r4.safetensors")),
        ("merge locon + loha into single file (fp16)", ["merge", o("locon.safetensors") + ":0.8",
                                                        o("loha.safetensors"), "--into", o("sd15.safetensors"),
                                                        "--out", o("merged.safetensors")], o("merged.safetensors")),
        ("merge locon into diffusers folder", ["merge", o("locon.safetensors"), "--into", o("sd15"), "--out",
                                               o("merged_folder")], o("merged_folder")),
        ("merge locon + locon_r4 -> one LoCon (exact)", ["merge", o("locon.safetensors"), o("locon_r4.safetensors"),
                                                         "--out", o("combined.safetensors")], o("combined.safetensors")),
        ("convert lokr_tucker for comfyui", ["convert", o("lokr_tucker.safetensors"), "--for", "comfyui", "--out",
                                             o("lokr_comfy.safetensors")], o("lokr_comfy.safetensors")),
        ("convert locon_dora_out for a1111 (diff)", ["convert", o("locon_dora_out.safetensors"), "--for", "a1111",
                                                     "--base", o("sd15.safetensors"), "--out", o("dora_diff.safetensors")],
         o("dora_diff.safetensors")),
        ("convert loha for diffusers (exact LoCon)", ["convert", o("loha.safetensors"), "--for", "diffusers", "--base",
                                                      o("sd15.safetensors"), "--out", o("loha_diffusers.safetensors")],
         o("loha_diffusers.safetensors")),
    ]
    if not a.skip_extract:
        runs.append(("extract merged - base, rank 16 / conv 8, --fast", ["extract", "--base", o("sd15.safetensors"),
                                                                         "--tuned", o("merged.safetensors"), "--rank",
                                                                         "16", "--conv-rank", "8", "--fast", "--out",
                                                                         o("extracted_fast.safetensors")],
                     o("extracted_fast.safetensors")))
        runs.append(("extract merged - base, rank 16 / conv 8", ["extract", "--base", o("sd15.safetensors"), "--tuned",
                                                                 o("merged.safetensors"), "--rank", "16", "--conv-rank",
                                                                 "8", "--out", o("extracted.safetensors")],
                     o("extracted.safetensors")))
    log = o("bench.log")
    print(f"inputs: model single file {size(o('sd15.safetensors')) / 1e6:.0f} MB, folder {size(o('sd15')) / 1e6:.0f} MB; "
          + ", ".join(f"{n} {size(o(n + '.safetensors')) / 1e6:.1f} MB" for n in NETWORKS))
    print("| command | rc | wall s | peak RSS GiB | output MB |\n|---|---|---|---|---|")
    for label, cmd, out in runs:
        rc, wall, rss = timed(cmd + ["--force"], log)  # a rerun replaces its own outputs
        out_mb = f"{size(out) / 1e6:.1f}" if out and os.path.exists(out) else "-"
        print(f"| {label} | {rc} | {wall:.1f} | {rss:.2f} | {out_mb} |", flush=True)


if __name__ == "__main__":
    main()
