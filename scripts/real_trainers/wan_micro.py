"""Wan 2.1 T2V for musubi-tuner's real scripts, built locally from musubi's own classes.

- ``build(work)`` (run in the musubi venv) writes everything the real scripts read: a micro DiT
  (``WanModel``, 2 blocks, dim 128), a Wan VAE at its released size with random weights (``WanVAE_``,
  the one config musubi has), a micro UMT5 encoder (``T5Encoder``: 1 layer, but dim 4096 = the DiT's
  ``text_dim``), a local tokenizer where musubi's ``T5EncoderModel`` looks for its hub name (a folder
  ``Wan-AI/Wan2.1-T2V-14B/google/umt5-xxl`` under the working directory: transformers reads a local folder
  of that name before the hub), two 128x128 images with captions and the dataset TOML.
- ``install()`` (run by launch.py in the script's process, before musubi parses its arguments) registers
  the micro DiT as a task ``t2v-micro`` in musubi's ``WAN_CONFIGS`` (a copy of ``t2v-1.3B`` with the sizes
  below) and makes musubi's ``umt5_xxl()`` build the micro encoder. musubi's files are not changed.
- ``load_dit(path)`` loads the DiT with musubi's own ``load_wan_model`` (the reload check).

The training step sees 1 latent frame of 16x16 (64 tokens after the 2x2 patch); the text context is
padded to musubi's text_len (512), as in a real run.
"""
from __future__ import annotations

import copy
import functools
import os

import micro_dataset

TASK = "t2v-micro"
BASE_TASK = "t2v-1.3B"
MICRO_DIT = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=2)  # over t2v-1.3B's config
# UMT5-XXL with dim kept at 4096 (WanModel's text_dim is fixed): attention/FFN widths, depth, vocab shrunk
MICRO_T5 = dict(vocab_size=64, dim_attn=64, dim_ffn=64, num_heads=2, encoder_layers=1, decoder_layers=1)
# musubi's WanVAE builds this config (wan/modules/vae.py, _video_vae); only the weights are random here
VAE_CFG = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
TOKENIZER_DIR = os.path.join("Wan-AI", "Wan2.1-T2V-14B", "google", "umt5-xxl")  # musubi's default name + subfolder

ARCH = "wan"  # musubi's ARCHITECTURE_WAN: cache file suffix
MUSUBI_LORA = "musubi_tuner.networks.lora_wan"  # musubi's own LoRA for the family, for the module-count check


def install(size: str = "micro") -> None:
    from musubi_tuner.wan.configs import WAN_CONFIGS
    import musubi_tuner.wan.modules.t5 as t5

    cfg = copy.deepcopy(WAN_CONFIGS[BASE_TASK])
    cfg.update(MICRO_DIT)
    cfg.__name__ = f"Config: Wan T2V micro (lycoris_kohya runner, {MICRO_DIT})"
    WAN_CONFIGS[TASK] = cfg
    if not getattr(t5.umt5_xxl, "_lk_micro", False):
        real = t5.umt5_xxl

        @functools.wraps(real)
        def micro_umt5_xxl(**kwargs):
            return real(**{**MICRO_T5, **kwargs})

        micro_umt5_xxl._lk_micro = True
        t5.umt5_xxl = micro_umt5_xxl


def task_for(size: str) -> str:
    return TASK if size == "micro" else BASE_TASK


def _build_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in micro_dataset.CAPTIONS.values() for w in c.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocab) <= MICRO_T5["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def build(work: str, size: str = "micro") -> dict:
    """Write the models, tokenizer and dataset under ``work``; return their paths."""
    import torch
    from safetensors.torch import save_file
    from musubi_tuner.wan.modules.model import WanModel
    from musubi_tuner.wan.modules.vae import WanVAE_
    import musubi_tuner.wan.modules.t5 as t5

    install(size)
    from musubi_tuner.wan.configs import WAN_CONFIGS

    torch.manual_seed(0)
    os.makedirs(work, exist_ok=True)
    paths = {"dit": os.path.join(work, f"wan_{size}_dit.safetensors"), "vae": os.path.join(work, "wan_vae_random.safetensors"),
             "t5": os.path.join(work, "umt5_micro.safetensors"), "dataset_config": os.path.join(work, "dataset.toml"),
             "task": task_for(size)}

    cfg = WAN_CONFIGS[paths["task"]]
    if not os.path.exists(paths["dit"]):
        # the arguments load_wan_model passes to WanModel (wan/modules/model.py)
        dit = WanModel(model_type="t2v", model_version="2.1", dim=cfg.dim, eps=cfg.eps, ffn_dim=cfg.ffn_dim,
                       freq_dim=cfg.freq_dim, in_dim=cfg.in_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                       out_dim=cfg.out_dim, text_len=cfg.text_len, attn_mode="torch", split_attn=False)
        # WanModel.init_weights zeroes the output head (a fresh model predicts 0): no gradient would reach any
        # layer before it and every adapter would stay at its initial value. A trained head is not zero.
        torch.nn.init.xavier_uniform_(dit.head.head.weight)
        # fp32, not bf16: WanModel.forward runs its time embedding under autocast(dtype=float32), which CUDA
        # honours and CPU autocast disables ("target dtype is not supported"), so bf16 weights meet fp32 inputs
        # there. With fp32 weights musubi infers dit_dtype float32 and the blocks still run under bf16 autocast.
        save_file({k: v.float().contiguous() for k, v in dit.state_dict().items()}, paths["dit"])
        del dit
    if not os.path.exists(paths["vae"]):
        vae = WanVAE_(**VAE_CFG)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}, paths["vae"])
        del vae
    if not os.path.exists(paths["t5"]):
        enc = t5.umt5_xxl(encoder_only=True, return_tokenizer=False)  # the micro sizes, through install()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in enc.state_dict().items()}, paths["t5"])
        del enc
    tok_dir = os.path.join(work, TOKENIZER_DIR)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        _build_tokenizer(tok_dir)

    cache = micro_dataset.write(work, paths["dataset_config"])
    paths["cache_dir"] = cache
    return paths


def cache_commands(paths: dict) -> list:
    """musubi's own caching scripts, as (module, argv) pairs: the real VAE and T5 code paths."""
    return [
        ("musubi_tuner.wan_cache_latents",
         # float32: musubi's default bf16 VAE took 312 s an image here (CPU bf16 conv3d), fp32 4 s
         ["--dataset_config", paths["dataset_config"], "--vae", paths["vae"], "--device", "cpu", "--vae_dtype", "float32"]),
        ("musubi_tuner.wan_cache_text_encoder_outputs",
         ["--dataset_config", paths["dataset_config"], "--t5", paths["t5"], "--device", "cpu", "--batch_size", "1"]),
    ]


def train_args(paths: dict) -> list:
    """The family's part of the training command (the runner adds network, steps and output)."""
    return ["--task", paths["task"], "--dit", paths["dit"], "--dataset_config", paths["dataset_config"],
            "--sdpa", "--mixed_precision", "bf16", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0"]


def train_module() -> str:
    return "musubi_tuner.wan_train_network"


def load_dit(path: str, size: str = "micro"):
    """The DiT as musubi's trainer loads it (load_wan_model, in the file's fp32, on the CPU)."""
    import torch

    install(size)
    from musubi_tuner.wan.configs import WAN_CONFIGS
    from musubi_tuner.wan.modules.model import load_wan_model

    return load_wan_model(WAN_CONFIGS[task_for(size)], "cpu", path, "torch", False, "cpu", torch.float32)
