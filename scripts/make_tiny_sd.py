#!/usr/bin/env python
"""Build a tiny, deterministic, randomly initialised Stable Diffusion 1.x model (diffusers folder).

Fully offline and takes a few seconds. Layout of OUT:
  model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
loadable with
  StableDiffusionPipeline.from_pretrained(OUT, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)

The tokenizer is a real CLIP byte-level BPE tokenizer whose vocab.json / merges.txt are generated
here (256 byte symbols + their "</w>" variants + merges for a few caption words + special tokens).

CLI:     python scripts/make_tiny_sd.py --out DIR [--seed N] [--force]
Library: build_tiny_sd(out_dir, seed=0) -> str   (nothing runs at import time)
"""
import argparse
import json
import os
import shutil
import tempfile
import time

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CAPTION_WORDS = "a photo of red green blue square circle sks".split()
MAX_LENGTH = 77
HIDDEN = 32  # text encoder width == U-Net cross_attention_dim


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


def _build_tokenizer():
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
            pad_token="<|endoftext|>",  # SD1.x convention: pad == eos
            model_max_length=MAX_LENGTH,
        )
    ids = tok("a photo of a red square").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, ids
    assert all(0 <= i < vocab_size for i in ids), (ids, vocab_size)
    assert tok.unk_token_id not in ids[1:-1], ids  # every caption token is in the vocab
    return tok, vocab_size


def build_tiny_sd(out_dir, seed=0, force=False):
    """Build the tiny SD1.x diffusers folder in out_dir; return its absolute path.

    Skips the build when out_dir/model_index.json exists, unless force=True.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, "model_index.json")) and not force:
        print(f"tiny SD already present: {out_dir} (use --force to rebuild)")
        return out_dir
    t0 = time.time()

    tokenizer, vocab_size = _build_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=HIDDEN,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # used for the pooled output
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    torch.manual_seed(seed)
    vae = AutoencoderKL(  # 4 blocks -> 8x downsampling, like SD (64 px image -> 8x8 latent)
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )

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
    # remove only what we write, never the whole (user-given) folder
    for name in COMPONENTS:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; also keep vocab.json + merges.txt so that the slow
    # CLIPTokenizer of transformers 4.x (what sd-scripts uses) can load the folder too
    tok_dir = os.path.join(out_dir, "tokenizer")
    if not all(os.path.isfile(os.path.join(tok_dir, f)) for f in ("vocab.json", "merges.txt")):
        write_clip_bpe_files(tok_dir)

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(
        f"tiny SD (seed {seed}) -> {out_dir} in {time.time() - t0:.2f}s: "
        f"unet {n_params(unet) / 1e3:.0f}k, text_encoder {n_params(text_encoder) / 1e3:.0f}k, "
        f"vae {n_params(vae) / 1e3:.0f}k params, vocab {vocab_size}"
    )
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if OUT/model_index.json exists")
    a = p.parse_args(argv)
    t0 = time.time()
    path = build_tiny_sd(a.out, seed=a.seed, force=a.force)
    print(f"done in {time.time() - t0:.2f}s: {path}")


if __name__ == "__main__":
    main()
