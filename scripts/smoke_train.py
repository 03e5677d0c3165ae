#!/usr/bin/env python
"""Smoke train: a few steps on the tiny SD checkpoint through exactly the calls sd-scripts'
train_network.py makes, then a check that the saved file reproduces the trained network.

    python scripts/smoke_train.py                                  # LoCon, defaults below
    python scripts/smoke_train.py --network_args algo=loha conv_dim=4
    python scripts/smoke_train.py --config configs/examples/locon.toml

The calls, in sd-scripts' order: create_network -> apply_to -> prepare_optimizer_params ->
accelerator.prepare -> (noise-prediction loss, backward, step, apply_max_norm_regularization)* ->
save_weights -> create_network_from_weights (+ apply_to) and merge_to on fresh models, whose outputs
must equal the trained network's. Exit code 1 when they do not.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

DEFAULTS = {
    "pretrained_model_name_or_path": os.path.join(ROOT, "out", "tiny-sd"),
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_args": [],
    "network_dropout": None,
    "learning_rate": 1e-3,
    "unet_lr": None,
    "text_encoder_lr": None,
    "max_train_steps": 8,
    "scale_weight_norms": 1.0,
    "save_precision": "float",
    "output_dir": os.path.join(ROOT, "out", "smoke"),
    "output_name": None,
    "seed": 0,
    "network_train_unet_only": False,
}
PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def read_toml(path: str) -> dict:
    """sd-scripts --config_file semantics: top-level keys and the keys of every table, flattened.
    ``${ROOT}`` in strings is this repository's root."""
    import toml

    raw = toml.load(path)
    flat = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    for k, v in flat.items():
        if isinstance(v, str):
            flat[k] = v.replace("${ROOT}", ROOT)
    return flat


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="an sd-scripts --config_file TOML (its keys are the defaults here)")
    p.add_argument("--pretrained_model_name_or_path", "--model")
    p.add_argument("--network_dim", type=int)
    p.add_argument("--network_alpha", type=float)
    p.add_argument("--network_args", nargs="*", help="k=v items, as sd-scripts takes them")
    p.add_argument("--network_dropout", type=float)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--unet_lr", type=float)
    p.add_argument("--text_encoder_lr", type=float)
    p.add_argument("--max_train_steps", "--steps", type=int)
    p.add_argument("--scale_weight_norms", type=float)
    p.add_argument("--save_precision", choices=sorted(PRECISIONS))
    p.add_argument("--output_dir")
    p.add_argument("--output_name")
    p.add_argument("--seed", type=int)
    p.add_argument("--network_train_unet_only", action="store_true", default=None)
    a = vars(p.parse_args(argv))
    opts = dict(DEFAULTS)
    config = a.pop("config")
    if config:
        toml_opts = read_toml(config)
        if toml_opts.get("network_module", "lycoris_kohya") not in ("lycoris_kohya", "lycoris_kohya.kohya"):
            raise SystemExit(f"{config}: network_module must be lycoris_kohya")
        opts.update({k: v for k, v in toml_opts.items() if k in DEFAULTS})
    opts.update({k: v for k, v in a.items() if v is not None})
    if not opts["output_name"]:
        algo = dict(x.split("=", 1) for x in opts["network_args"]).get("algo", "locon")
        opts["output_name"] = f"smoke_{algo}"
    return opts


def make_batch(tokenizer, n: int, size: int = 64):
    """n coloured squares on noise, with captions; deterministic under the global seed."""
    import torch

    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
    names = list(colours)
    imgs, caps = [], []
    for i in range(n):
        c = names[i % len(names)]
        img = torch.rand(3, size, size) * 0.4 - 0.2
        lo, hi = size // 4, 3 * size // 4
        img[:, lo:hi, lo:hi] = torch.tensor(colours[c], dtype=torch.float32).view(3, 1, 1)
        imgs.append(img)
        caps.append(f"a photo of a {c} square")
    ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return torch.stack(imgs), ids


def load_models(path: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    for m in (unet, te):
        m.requires_grad_(False)
        m.eval()
    return unet, te


def main(argv=None) -> int:
    opts = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler
    from tqdm import tqdm
    from transformers import CLIPTokenizer

    import lycoris_kohya
    from make_tiny_sd import build_tiny_sd

    t_start = time.time()
    torch.manual_seed(opts["seed"])
    model = opts["pretrained_model_name_or_path"]
    if not os.path.exists(os.path.join(model, "model_index.json")):
        build_tiny_sd(model)

    unet, te = load_models(model)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")

    net_kwargs = dict(x.split("=", 1) for x in opts["network_args"])
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = opts["network_dropout"]  # what train_network.py adds
    network = lycoris_kohya.create_network(1.0, opts["network_dim"], opts["network_alpha"], vae, te, unet,
                                           neuron_dropout=opts["network_dropout"], **net_kwargs)
    train_te = not opts["network_train_unet_only"]
    network.apply_to(te, unet, apply_text_encoder=train_te, apply_unet=True)
    params, descriptions = network.prepare_optimizer_params(opts["text_encoder_lr"], opts["unet_lr"],
                                                            opts["learning_rate"])
    optimizer = torch.optim.AdamW(params, lr=opts["learning_rate"])
    accelerator = Accelerator(cpu=True)
    network, optimizer = accelerator.prepare(network, optimizer)
    net = accelerator.unwrap_model(network)
    net.prepare_grad_etc(te, unet)
    net.on_epoch_start(te, unet)

    images, ids = make_batch(tokenizer, 4)
    with torch.no_grad():
        latents_all = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor

    steps, limit = opts["max_train_steps"], opts["scale_weight_norms"]
    print(f"training {net.config.algo}: {len(net.unet_loras)} U-Net + {len(net.text_encoder_loras)} text "
          f"encoder modules, groups {descriptions}, {steps} steps")
    bar = tqdm(range(steps), desc="smoke train")
    for step in bar:
        i = step % latents_all.shape[0]
        latents, token_ids = latents_all[i:i + 1], ids[i:i + 1]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        with accelerator.autocast():
            enc = te(token_ids)[0]
            pred = unet(noisy, t, enc).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        postfix = {"loss": f"{loss.item():.4f}"}
        if limit:
            scaled, mean_norm, max_norm = net.apply_max_norm_regularization(limit, accelerator.device)
            if not (type(scaled) is int and type(mean_norm) is float and type(max_norm) is float):
                print(f"apply_max_norm_regularization returned {type(scaled)}, {type(mean_norm)}, {type(max_norm)}")
                return 1
            postfix.update({"keys_scaled": scaled, "avg_key_norm": f"{mean_norm:.4g}", "max_key_norm": f"{max_norm:.4g}"})
        bar.set_postfix(postfix)
    bar.close()

    os.makedirs(opts["output_dir"], exist_ok=True)
    out = os.path.join(opts["output_dir"], opts["output_name"] + ".safetensors")
    dtype = getattr(torch, PRECISIONS[opts["save_precision"]])
    metadata = {"ss_network_module": "lycoris_kohya", "ss_network_dim": str(opts["network_dim"]),
                "ss_network_alpha": str(opts["network_alpha"]), "ss_network_args": str(net_kwargs),
                "ss_base_model_version": "sd_v1", "ss_v2": "False"}
    net.save_weights(out, dtype, metadata)
    print(f"saved {out}")
    return verify(net, out, model, te, unet, train_te, dtype, time.time() - t_start)


def verify(net, out, model, te, unet, train_te, dtype, seconds) -> int:
    """The trained network, a reloaded one (create_network_from_weights + apply_to) and a merge
    (merge_to) must give the same U-Net and text encoder outputs."""
    import torch

    import lycoris_kohya

    torch.manual_seed(1234)
    x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randint(0, 500, (2, 77))

    def outputs(te_, unet_):
        with torch.no_grad():
            enc = te_(ids)[0]
            return enc, unet_(x, t, enc).sample

    net.eval()
    if dtype != torch.float32:  # compare against what the file holds
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.to(dtype).float())
    ref = outputs(te, unet)

    unet2, te2 = load_models(model)
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, out, None, te2, unet2)
    loaded.apply_to(te2, unet2, apply_text_encoder=train_te)
    loaded.eval()
    got_loaded = outputs(te2, unet2)

    unet3, te3 = load_models(model)
    merger, sd = lycoris_kohya.create_network_from_weights(1.0, out, None, te3, unet3, for_inference=True)
    merger.merge_to(te3, unet3, sd, torch.float32, "cpu")
    got_merged = outputs(te3, unet3)

    unet4, te4 = load_models(model)
    base = outputs(te4, unet4)

    ok = True
    scale = float(ref[1].abs().max())
    for label, got in (("reloaded", got_loaded), ("merged", got_merged)):
        for part, a, b in (("text encoder", ref[0], got[0]), ("unet", ref[1], got[1])):
            diff = float((a - b).abs().max())
            good = diff <= 1e-4 * max(1.0, float(a.abs().max()))
            ok &= good
            print(f"{label:9s} {part:12s} max|diff| = {diff:.3g} {'ok' if good else 'MISMATCH'}")
    moved = float((ref[1] - base[1]).abs().max())
    print(f"training moved the U-Net output by {moved:.3g} (of {scale:.3g}) from the base model")
    ok &= moved > 0
    print(f"smoke train {'passed' if ok else 'FAILED'} in {seconds:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
