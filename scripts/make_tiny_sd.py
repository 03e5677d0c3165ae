#!/usr/bin/env python
"""Build a tiny, deterministic, randomly initialised Stable Diffusion 1.x or SDXL model (diffusers folder).

Fully offline and takes a few seconds. Layout of OUT:
  SD1.x: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
  SDXL:  the same plus text_encoder_2/, tokenizer_2/
loadable with StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained(OUT) (SD1.x:
safety_checker=None, feature_extractor=None, requires_safety_checker=False).

The tokenizers are real CLIP byte-level BPE tokenizers whose vocab.json / merges.txt are generated
here (256 byte symbols + their "</w>" variants + merges for a few caption words + special tokens).

SDXL (--sdxl): the SDXL base layout at tiny widths: a U-Net with 3 levels (no attention at level 0,
transformer depth 1 and 2 at levels 1 and 2, where SDXL has 2 and 10), 2 res blocks per level,
linear projections and addition_embed_type="text_time" (pooled TE2 output + 6 size/crop time ids);
a CLIP-L-like CLIPTextModel (32 wide) and an OpenCLIP-G-like CLIPTextModelWithProjection (48 wide,
pooled projection 40), whose penultimate hidden states are concatenated as the U-Net's context (80).
The widths differ on purpose, so that mixing up the two text encoders fails loudly.

CLI:     python scripts/make_tiny_sd.py --out DIR [--sdxl] [--seed N] [--force]
Library: build_tiny_sd(out_dir, seed=0) -> str, build_tiny_sdxl(out_dir, seed=0) -> str
         (nothing runs at import time)
"""
import argparse
import json
import os
import shutil
import tempfile
import time

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
CAPTION_WORDS = "a photo of red green blue square circle sks".split()
MAX_LENGTH = 77
HIDDEN = 32  # text encoder width == U-Net cross_attention_dim
# SDXL: context = concat(TE1, TE2 penultimate hidden states); added cond = TE2 pooled + 6 time ids
SDXL_TE1, SDXL_TE2, SDXL_POOLED, SDXL_TIME_DIM = 32, 48, 40, 8


def _byte_symbols():
    """CLIP/GPT-2 byte -> printable unicode table (same mapping as transformers' bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_clip_bpe_files(folder):
    """Write vocab.json + merges.txt; return (vocab_path, merges_path, vocab_size).

    Merges are built left to right per word ("p h", "ph o", ..., "phot o</w>"); every merge result
    is added to the vocab, so whatever order BPE applies them in, every produced token exists.
    """
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    known, merges = set(vocab), []
    for word in CAPTION_WORDS:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left += right
            if left not in known:
                vocab.append(left)
                known.add(left)
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # as in real CLIP: the specials are the last ids

    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path, len(vocab)


def _build_tokenizer(pad_token="<|endoftext|>"):
    """SD1.x and SDXL's first tokenizer pad with the end token; SDXL's second one pads with "!"."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path, vocab_size = write_clip_bpe_files(tmp)
        # positional file paths: transformers 4.x (vocab_file, merges_file) and 5.x (vocab, merges)
        tok = CLIPTokenizer(
            vocab_path,
            merges_path,
            unk_token="<|endoftext|>",
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token=pad_token,
            model_max_length=MAX_LENGTH,
        )
    ids = tok("a photo of a red square").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, ids
    assert all(0 <= i < vocab_size for i in ids), (ids, vocab_size)
    assert tok.unk_token_id not in ids[1:-1], ids  # every caption token is in the vocab
    return tok, vocab_size


def _tiny_vae(scaling_factor=0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # 4 blocks -> 8x downsampling, like SD (64 px image -> 8x8 latent)
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _save(pipe, out_dir, components):
    # remove only what we write, never the whole (user-given) folder
    for name in components:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; also keep vocab.json + merges.txt so that the slow
    # CLIPTokenizer of transformers 4.x (what sd-scripts uses) can load the folder too
    for tok in ("tokenizer", "tokenizer_2"):
        tok_dir = os.path.join(out_dir, tok)
        if tok in components and not all(os.path.isfile(os.path.join(tok_dir, f)) for f in ("vocab.json", "merges.txt")):
            write_clip_bpe_files(tok_dir)


def _clip_config(tokenizer, vocab_size, hidden, layers, heads, projection_dim, act="quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # used for the pooled output
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sd(out_dir, seed=0, force=False):
    """Build the tiny SD1.x diffusers folder in out_dir; return its absolute path.

    Skips the build when out_dir/model_index.json exists, unless force=True.
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, "model_index.json")) and not force:
        print(f"tiny SD already present: {out_dir} (use --force to rebuild)")
        return out_dir
    t0 = time.time()

    tokenizer, vocab_size = _build_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, vocab_size, HIDDEN, 2, 4, HIDDEN))

    torch.manual_seed(seed)
    vae = _tiny_vae()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,  # SD1.x legacy meaning: number of heads
        cross_attention_dim=HIDDEN,
        norm_num_groups=8,
        use_linear_projection=False,
    )

    scheduler = DDPMScheduler(  # SD1.5 training schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, out_dir, COMPONENTS)

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(
        f"tiny SD (seed {seed}) -> {out_dir} in {time.time() - t0:.2f}s: "
        f"unet {n_params(unet) / 1e3:.0f}k, text_encoder {n_params(text_encoder) / 1e3:.0f}k, "
        f"vae {n_params(vae) / 1e3:.0f}k params, vocab {vocab_size}"
    )
    return out_dir


def build_tiny_sdxl(out_dir, seed=0, force=False):
    """Build the tiny SDXL diffusers folder in out_dir (see the module docstring); return its
    absolute path. Skips the build when out_dir/model_index.json exists, unless force=True."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, "model_index.json")) and not force:
        print(f"tiny SDXL already present: {out_dir} (use --force to rebuild)")
        return out_dir
    t0 = time.time()

    tokenizer, vocab_size = _build_tokenizer()
    tokenizer_2, _ = _build_tokenizer(pad_token="!")  # OpenCLIP's padding, as in SDXL's tokenizer_2

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, vocab_size, SDXL_TE1, 2, 4, SDXL_TE1))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(tokenizer_2, vocab_size, SDXL_TE2, 2, 4, SDXL_POOLED, act="gelu"))

    torch.manual_seed(seed)
    vae = _tiny_vae(scaling_factor=0.13025)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # SDXL base's block structure, tiny widths
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        attention_head_dim=(1, 2, 4),  # heads per level
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=SDXL_TE1 + SDXL_TE2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_DIM,
        norm_num_groups=8,
    )

    scheduler = EulerDiscreteScheduler(  # SDXL base's; trainers build their own DDPM schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    _save(pipe, out_dir, SDXL_COMPONENTS)

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(
        f"tiny SDXL (seed {seed}) -> {out_dir} in {time.time() - t0:.2f}s: "
        f"unet {n_params(unet) / 1e3:.0f}k, text_encoder {n_params(text_encoder) / 1e3:.0f}k, "
        f"text_encoder_2 {n_params(text_encoder_2) / 1e3:.0f}k, vae {n_params(vae) / 1e3:.0f}k params"
    )
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--sdxl", action="store_true", help="an SDXL model (two text encoders, text_time conditioning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if OUT/model_index.json exists")
    a = p.parse_args(argv)
    t0 = time.time()
    path = (build_tiny_sdxl if a.sdxl else build_tiny_sd)(a.out, seed=a.seed, force=a.force)
    print(f"done in {time.time() - t0:.2f}s: {path}")


if __name__ == "__main__":
    main()
