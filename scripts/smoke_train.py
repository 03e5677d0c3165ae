#!/usr/bin/env python
"""Smoke train: a few steps on a tiny SD1.x or SDXL checkpoint through exactly the calls sd-scripts'
train_network.py / sdxl_train_network.py make, then a check that the saved file reproduces the
trained network.

    python scripts/smoke_train.py                                  # SD1.x, LoCon, defaults below
    python scripts/smoke_train.py --network_args algo=loha conv_dim=4
    python scripts/smoke_train.py --config configs/examples/locon.toml
    python scripts/smoke_train.py --sdxl --network_args algo=lokr dora_wd=true
    torchrun --nproc_per_node 2 scripts/smoke_train.py --network_args module_dropout=0.3 rank_dropout=0.2

The calls, in sd-scripts' order: create_network -> apply_to -> prepare_optimizer_params(_with_multiple_te_lrs)
-> accelerator.prepare -> (noise-prediction loss, backward, all_reduce_network, step,
apply_max_norm_regularization)* -> save_weights (main process) -> create_network_from_weights
(+ apply_to) and merge_to on fresh models, whose outputs must equal the trained network's.

SDXL (--sdxl): text_encoder is [te1, te2] (keys lora_te1_/lora_te2_), one learning rate per text
encoder, the U-Net seen through sd-scripts' own module paths (scripts/sgm_unet.py: keys
lora_unet_input_blocks_...), conditioned as sdxl_train_network.py does: context = both encoders'
penultimate hidden states concatenated, plus TE2's pooled projection and 6 size/crop time ids.

Several processes (torchrun): accelerate runs DDP over gloo. As in sd-scripts, the DDP wrapper's
forward is never called (the adapters run inside the U-Net and text encoders), gradients are
averaged by hand after backward, and only the main process saves. Every rank checks that all ranks
skipped the same modules (module_dropout), got the same max-norm results at every step and end
with bit-identical adapter weights.

Exit code 1 when any check fails.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

DEFAULTS = {
    "pretrained_model_name_or_path": None,  # out/tiny-sd or out/tiny-sdxl, built when missing
    "sdxl": False,
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_args": [],
    "network_dropout": None,
    "learning_rate": 1e-3,
    "unet_lr": None,
    "text_encoder_lr": None,  # SDXL: one per text encoder (default 5e-4 2.5e-4)
    "max_train_steps": 8,
    "scale_weight_norms": 1.0,
    "save_precision": "float",
    "output_dir": os.path.join(ROOT, "out", "smoke"),
    "output_name": None,
    "seed": 0,
    "network_train_unet_only": False,
}
SDXL_TE_LRS = [5e-4, 2.5e-4]
PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SIZE = 64  # image side; SDXL's time ids are (original h, w, crop top, left, target h, w)


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
    p.add_argument("--sdxl", action="store_true", default=None, help="an SDXL model, as sdxl_train_network.py")
    p.add_argument("--network_dim", type=int)
    p.add_argument("--network_alpha", type=float)
    p.add_argument("--network_args", nargs="*", help="k=v items, as sd-scripts takes them")
    p.add_argument("--network_dropout", type=float)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--unet_lr", type=float)
    p.add_argument("--text_encoder_lr", type=float, nargs="*", help="one value, or one per text encoder (SDXL)")
    p.add_argument("--max_train_steps", "--steps", type=int)
    p.add_argument("--scale_weight_norms", type=float)
    p.add_argument("--save_precision", choices=sorted(PRECISIONS))
    p.add_argument("--output_dir")
    p.add_argument("--output_name")
    p.add_argument("--seed", type=int)
    p.add_argument("--seed_per_process", action="store_true",
                   help="seed each process differently (the trainers without --seed)")
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
    if not opts["pretrained_model_name_or_path"]:
        opts["pretrained_model_name_or_path"] = os.path.join(ROOT, "out", "tiny-sdxl" if opts["sdxl"] else "tiny-sd")
    lrs = opts["text_encoder_lr"]
    if isinstance(lrs, (int, float)):
        lrs = [lrs]
    if not lrs and opts["sdxl"]:
        lrs = SDXL_TE_LRS
    opts["text_encoder_lr"] = list(lrs) if lrs else None
    if not opts["output_name"]:
        algo = dict(x.split("=", 1) for x in opts["network_args"]).get("algo", "locon")
        opts["output_name"] = f"smoke_{'sdxl_' if opts['sdxl'] else ''}{algo}"
    return opts


class Models:
    """A checkpoint's text encoder(s) and U-Net, frozen, and the two calls a trainer makes.

    ``text_encoder`` / ``unet`` are what sd-scripts hands to the network: SD1.x one CLIPTextModel
    and the U-Net; SDXL [CLIPTextModel, CLIPTextModelWithProjection] and the U-Net under sd-scripts'
    module paths."""

    def __init__(self, path: str, sdxl: bool):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.sdxl = sdxl
        self.diffusers_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        self.text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
        if sdxl:
            from sgm_unet import SgmUNet

            self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
            self.unet = SgmUNet(self.diffusers_unet)
        else:
            self.unet = self.diffusers_unet
        for m in self.text_encoders + [self.diffusers_unet]:
            m.requires_grad_(False)
            m.eval()
        self.text_encoder = self.text_encoders if sdxl else self.text_encoders[0]

    def encode(self, ids):
        """The text conditioning: SD1.x (last hidden state,); SDXL (TE1 and TE2 penultimate hidden
        states, TE2's pooled projection), as sd-scripts' SDXL text encoding strategy."""
        if not self.sdxl:
            return (self.text_encoders[0](ids[0])[0],)
        h1 = self.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoders[1](ids[1], output_hidden_states=True)
        return h1, out2.hidden_states[-2], out2.text_embeds

    def predict(self, noisy, t, cond):
        import torch

        if not self.sdxl:
            return self.unet(noisy, t, cond[0]).sample
        h1, h2, pooled = cond
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=noisy.dtype).repeat(noisy.shape[0], 1)
        return self.unet(noisy, t, torch.cat([h1, h2], dim=-1), pooled, time_ids)


def tokenizers(path: str, sdxl: bool):
    from transformers import CLIPTokenizer

    toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if sdxl:
        toks.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    return toks


def make_batch(toks, n: int, size: int = SIZE):
    """n coloured squares on noise, with captions (token ids per tokenizer); deterministic under the
    global seed."""
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
    ids = [tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in toks]
    return torch.stack(imgs), ids


def all_reduce_network(accelerator, network) -> None:
    """sd-scripts' NetworkTrainer.all_reduce_network: average every gradient over the processes."""
    for param in network.parameters():
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def fingerprint(net) -> str:
    """sha256 over every adapter tensor's name, dtype and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name} {t.dtype} {list(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_te_groups(net, params, te_lrs) -> list:
    """With one learning rate per text encoder (sdxl_train_network.py's --text_encoder_lr a b): each
    text encoder's adapters, and only they, fill their own group(s), the plain one at their rate."""
    problems = []
    prefixes = sorted({a.lora_name.split("_text_model_")[0] for a in net.text_encoder_loras})
    for i, prefix in enumerate(prefixes):
        want = {id(p) for a in net.text_encoder_loras if a.lora_name.startswith(prefix + "_") for p in a.parameters()}
        lr = te_lrs[i] if i < len(te_lrs) else te_lrs[-1]
        groups = [{id(p) for p in g["params"]} for g in params]
        mine = [k for k, g in enumerate(groups) if g & want]
        if (any(not groups[k] <= want for k in mine) or set().union(*(groups[k] for k in mine)) != want
                or lr not in [params[k].get("lr") for k in mine]):
            problems.append(f"{prefix}: expected its adapters, alone, in group(s) at lr {lr}; got (size, lr) "
                            f"{[(len(params[k]['params']), params[k].get('lr')) for k in mine]}")
    return problems


def main(argv=None) -> int:
    opts = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from diffusers import AutoencoderKL, DDPMScheduler
    from tqdm import tqdm

    import lycoris_kohya
    from make_tiny_sd import build_tiny_sd, build_tiny_sdxl

    t_start = time.time()
    accelerator = Accelerator(cpu=True)  # several processes under torchrun: DDP over gloo
    rank, world = accelerator.process_index, accelerator.num_processes
    sdxl = opts["sdxl"]
    model = opts["pretrained_model_name_or_path"]
    if accelerator.is_main_process and not os.path.exists(os.path.join(model, "model_index.json")):
        (build_tiny_sdxl if sdxl else build_tiny_sd)(model)
    accelerator.wait_for_everyone()
    # the same seed on every rank, as sd-scripts' set_seed(args.seed); --seed_per_process: a seed of
    # each process's own, as sd-scripts and musubi-tuner draw one without --seed
    torch.manual_seed(opts["seed"] + (rank if opts["seed_per_process"] else 0))

    models = Models(model, sdxl)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False).eval()
    toks = tokenizers(model, sdxl)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,  # sd-scripts'
                              beta_schedule="scaled_linear", clip_sample=False)

    net_kwargs = dict(x.split("=", 1) for x in opts["network_args"])
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = opts["network_dropout"]  # what train_network.py adds
    network = lycoris_kohya.create_network(1.0, opts["network_dim"], opts["network_alpha"], vae, models.text_encoder,
                                           models.unet, neuron_dropout=opts["network_dropout"], **net_kwargs)
    train_te = not opts["network_train_unet_only"]
    network.apply_to(models.text_encoder, models.unet, apply_text_encoder=train_te, apply_unet=True)
    te_lrs = opts["text_encoder_lr"]
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(te_lrs, opts["unet_lr"],
                                                                                 opts["learning_rate"])
    problems = check_te_groups(network, params, te_lrs) if te_lrs and train_te else []
    optimizer = torch.optim.AdamW(params, lr=opts["learning_rate"])
    network, optimizer = accelerator.prepare(network, optimizer)
    net = accelerator.unwrap_model(network)
    net.prepare_grad_etc(models.text_encoder, models.unet)
    net.on_epoch_start(models.text_encoder, models.unet)

    images, ids = make_batch(toks, 4)
    with torch.no_grad():
        latents_all = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor

    steps, limit = opts["max_train_steps"], opts["scale_weight_norms"]
    if accelerator.is_main_process:
        print(f"training on {'SDXL' if sdxl else 'SD1.x'} in {world} process(es), {steps} steps: {net.summary()}; "
              f"optimizer groups {descriptions}")
    max_norm_log = []
    bar = tqdm(range(steps), desc="smoke train", disable=not accelerator.is_main_process)
    for step in bar:
        net.on_step_start()  # as musubi-tuner calls it (sd-scripts passes its models)
        i = (step * world + rank) % latents_all.shape[0]  # each rank its own sample, as a sharded loader
        latents, token_ids = latents_all[i:i + 1], [x[i:i + 1] for x in ids]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        with accelerator.autocast():
            pred = models.predict(noisy, t, models.encode(token_ids))
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        if world > 1:
            # the hand-made all-reduce below is one collective per gradient that exists: every rank
            # must have skipped the same modules (module_dropout) or the collectives pair up wrongly
            has_grad = "".join("1" if p.grad is not None else "0" for p in network.parameters())
            if len(set(gather_object([has_grad]))) != 1:
                problems.append(f"step {step}: the ranks skipped different modules; gradients cannot be averaged")
                break
        all_reduce_network(accelerator, network)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        postfix = {"loss": f"{loss.item():.4f}"}
        if limit:
            result = net.apply_max_norm_regularization(limit, accelerator.device)
            scaled, mean_norm, max_norm = result
            if not (type(scaled) is int and type(mean_norm) is float and type(max_norm) is float):
                problems.append(f"apply_max_norm_regularization returned {[type(x) for x in result]}")
                break
            max_norm_log.append(result)
            postfix.update({"keys_scaled": scaled, "avg_key_norm": f"{mean_norm:.4g}", "max_key_norm": f"{max_norm:.4g}"})
        bar.set_postfix(postfix)
    bar.close()

    if world > 1:
        logs, prints = gather_object([max_norm_log]), gather_object([fingerprint(net)])
        if any(log != logs[0] for log in logs):
            problems.append(f"apply_max_norm_regularization differs between ranks: {logs}")
        if len(set(prints)) != 1:
            problems.append(f"adapter weights differ between ranks: {prints}")
        elif accelerator.is_main_process:
            print(f"{world} ranks: identical max-norm results at all {len(logs[0])} steps and bit-identical "
                  f"adapter weights (sha256 {prints[0][:16]})")
    if max_norm_log and accelerator.is_main_process:
        print("max-norm (keys_scaled, avg_key_norm, max_key_norm) per step: "
              + ", ".join(f"({s}, {m:.4g}, {x:.4g})" for s, m, x in max_norm_log))

    out = os.path.join(opts["output_dir"], opts["output_name"] + ".safetensors")
    dtype = getattr(torch, PRECISIONS[opts["save_precision"]])
    rc = 1 if problems else 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # sd-scripts saves from the main process only
        for p in problems:
            print(f"FAILED: {p}")
        if not problems:
            os.makedirs(opts["output_dir"], exist_ok=True)
            metadata = {"ss_network_module": "lycoris_kohya", "ss_network_dim": str(opts["network_dim"]),
                        "ss_network_alpha": str(opts["network_alpha"]), "ss_network_args": str(net_kwargs)}
            if not sdxl:  # SDXL: the network marks the file itself
                metadata.update({"ss_base_model_version": "sd_v1", "ss_v2": "False"})
            net.save_weights(out, dtype, metadata)
            print(f"saved {out}")
            rc = verify(net, out, model, models, train_te, dtype, time.time() - t_start)
    if world > 1:
        rc = max(gather_object([rc]))
        # drop the DDP wrapper while every rank is still here, then the process group: freed only at
        # exit, after a peer had gone, it hung one run in a few (gloo, torch 2.13)
        network = optimizer = None
        accelerator.free_memory()
        gc.collect()
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return rc


def verify(net, out, model, models, train_te, dtype, seconds) -> int:
    """The trained network, a reloaded one (create_network_from_weights + apply_to) and a merge
    (merge_to) must give the same text encoder and U-Net outputs; SDXL files must say so."""
    import torch
    from safetensors import safe_open

    import lycoris_kohya

    sdxl = models.sdxl
    torch.manual_seed(1234)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ids = [torch.randint(0, 500, (2, 77)) for _ in models.text_encoders]

    def outputs(m):
        with torch.no_grad():
            cond = m.encode(ids)
            return (*cond, m.predict(x, t, cond))

    net.eval()
    if dtype != torch.float32:  # compare against what the file holds
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.to(dtype).float())
    ref = outputs(models)

    m2 = Models(model, sdxl)
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, out, None, m2.text_encoder, m2.unet)
    loaded.apply_to(m2.text_encoder, m2.unet, apply_text_encoder=train_te)
    loaded.eval()
    got_loaded = outputs(m2)

    m3 = Models(model, sdxl)
    merger, sd = lycoris_kohya.create_network_from_weights(1.0, out, None, m3.text_encoder, m3.unet,
                                                           for_inference=True)
    merger.merge_to(m3.text_encoder, m3.unet, sd, torch.float32, "cpu")
    got_merged = outputs(m3)

    base = outputs(Models(model, sdxl))

    failed = []  # (check, why): every check prints a line; the summary names the failed ones

    def check(name: str, good: bool, line: str, why: str = "") -> None:
        print(f"{line} {'ok' if good else 'FAILED'}" + ("" if good or not why else f" ({why})"))
        if not good:
            failed.append(f"{name}: {why}" if why else name)

    parts = ("te1 hidden", "te2 hidden", "te2 pooled", "unet") if sdxl else ("text encoder", "unet")
    for label, got in (("reloaded", got_loaded), ("merged", got_merged)):
        for part, a, b in zip(parts, ref, got):
            diff = float((a - b).abs().max())
            bound = 1e-4 * max(1.0, float(a.abs().max()))
            check(f"{label} {part}", diff <= bound, f"{label:9s} {part:12s} max|diff| = {diff:.3g}",
                  f"more than {bound:.3g}: the {label} network does not reproduce the trained one")
    # what moves is what the chosen preset adapts: the U-Net if it has modules, the text encoder(s)
    # if they have modules and are trained
    scale = float(ref[-1].abs().max())
    moved = float((ref[-1] - base[-1]).abs().max())
    if net.unet_loras:
        check("U-Net moved", moved > 0, f"training moved the U-Net output by {moved:.3g} (of {scale:.3g}) from the "
              "base model", f"{len(net.unet_loras)} U-Net modules trained, yet the output equals the base model's")
    else:
        print(f"the preset adapts no U-Net layer: its output moved by {moved:.3g} (not checked)")
    te_trained = train_te and bool(net.text_encoder_loras)
    te_moved = max(float((a - b).abs().max()) for a, b in zip(ref[:-1], base[:-1]))
    if te_trained:
        check("text encoder moved", te_moved > 0, f"training moved the text encoder outputs by {te_moved:.3g}",
              f"{len(net.text_encoder_loras)} text encoder modules trained, yet its outputs equal the base model's")
    else:
        why = "--network_train_unet_only" if not train_te else "the preset adapts no text encoder layer"
        check("text encoder unchanged", te_moved == 0,
              f"text encoder not trained ({why}): its outputs moved by {te_moved:.3g}",
              "an untrained text encoder's outputs changed")

    with safe_open(out, "pt") as f:
        keys, version = list(f.keys()), (f.metadata() or {}).get("ss_base_model_version", "")
    if sdxl:
        te_prefixes = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")
        unet_prefixes = tuple(f"lora_unet_{b}_" for b in ("input_blocks", "middle_block", "output_blocks"))
        wrong = [k for k in keys if not k.startswith(te_prefixes + unet_prefixes)]
        want = (te_prefixes if te_trained else ()) + (unet_prefixes if net.unet_loras else ())
        missing = [p for p in want if not any(k.startswith(p) for k in keys)]
        print(f"SDXL file: {len(keys)} keys, ss_base_model_version={version!r}")
        check("SDXL key names", not wrong, "keys in sd-scripts' SDXL names:", f"outside them: {wrong[:3]}")
        check("SDXL parts", not missing, "every adapted part has keys:", f"no key starts with {missing[:3]}")
        check("SDXL metadata", version.startswith("sdxl_"), f"ss_base_model_version={version!r} marks SDXL:",
              "A1111 would not list the file under SDXL models")
    if failed:
        print(f"smoke train FAILED in {seconds:.1f}s: " + "; ".join(failed))
        return 1
    print(f"smoke train passed in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
