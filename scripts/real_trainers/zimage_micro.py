"""Z-Image for musubi-tuner's real scripts, built locally from musubi's own classes.

- ``build(work)`` (run in the musubi venv) writes everything the real scripts read: a micro DiT
  (``ZImageTransformer2DModel``: 3 layers (block swap takes at most layers - 2), 1 noise and 1 context refiner, dim 256, 2 heads of 128 = the sum of
  musubi's RoPE axes), the Z-Image VAE at its released size with random weights (``AutoencoderKL`` with the
  arguments of musubi's ``load_autoencoder_kl``, which fixes the channels), a micro Qwen3 text encoder
  (``Qwen3ForCausalLM`` from musubi's own 4B config with the sizes below; its width is the DiT's
  ``cap_feat_dim``), a byte-level BPE ``Qwen2Tokenizer`` with a chat template, saved where musubi's
  ``load_qwen3`` looks for it by its hub name (``Tongyi-MAI/Z-Image``, subfolder ``tokenizer``, under the
  working directory: transformers reads a local folder of that name before the hub), two 128x128 images with
  captions and the dataset TOML.
- ``install()`` (run by inside.py in the script's process, before musubi parses its arguments) sets the
  DiT sizes in musubi's ``zimage_config`` (``create_model`` reads ``zimage_config.DEFAULT_TRANSFORMER_*`` at
  call time) and makes ``zimage_utils.Qwen3Config`` give the micro text encoder (``load_qwen3`` builds
  ``Qwen3Config(**its 4B json)``). musubi's files are not changed.
- ``load_dit(path)`` loads the DiT with musubi's own ``load_zimage_model`` (the reload check).

The training step sees 16x16 latents (64 tokens after the 2x2 patch) and the caption's tokens (the chat
template around it, byte-level, about 50), which musubi caches trimmed to their length.
"""
from __future__ import annotations

import json
import os

import micro_dataset

# over zimage_config's DEFAULT_TRANSFORMER_* (dim 3840, 30 layers, 2 refiners, 30 heads, cap_feat_dim 2560);
# head_dim = dim / heads must equal sum(ROPE_AXES_DIMS) = 128, which stays as released
MICRO_DIT = dict(DEFAULT_TRANSFORMER_DIM=256, DEFAULT_TRANSFORMER_N_LAYERS=3, DEFAULT_TRANSFORMER_N_REFINER_LAYERS=1,
                 DEFAULT_TRANSFORMER_N_HEADS=2, DEFAULT_TRANSFORMER_N_KV_HEADS=2, DEFAULT_TRANSFORMER_CAP_FEAT_DIM=64)
# over the Qwen3-4B config of zimage_utils.load_qwen3; hidden_size = the DiT's cap_feat_dim. Two layers:
# musubi takes hidden_states[-2], the output of the last layer but one.
MICRO_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_window_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=320,
                   bos_token_id=256, eos_token_id=258)
TOKENIZER_DIR = os.path.join("Tongyi-MAI", "Z-Image", "tokenizer")  # zimage_utils.ZIMAGE_ID + subfolder
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258 after the 256 byte tokens
# Qwen3's template for one user turn and the generation prompt (enable_thinking=True adds nothing)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCH = "zi"  # musubi's ARCHITECTURE_Z_IMAGE
MUSUBI_LORA = "musubi_tuner.networks.lora_zimage"  # musubi's own LoRA for the family, for the module-count check


def install(size: str = "micro") -> None:
    if size != "micro":
        return
    from musubi_tuner.zimage import zimage_config, zimage_utils

    for k, v in MICRO_DIT.items():
        setattr(zimage_config, k, v)
    if not getattr(zimage_utils.Qwen3Config, "_lk_micro", False):
        real = zimage_utils.Qwen3Config

        def micro_qwen3_config(**kwargs):
            return real(**{**kwargs, **MICRO_QWEN3})

        micro_qwen3_config._lk_micro = True
        zimage_utils.Qwen3Config = micro_qwen3_config


def _build_tokenizer(path: str) -> None:
    """A byte-level BPE with no merges (every byte one token) and Qwen's special tokens."""
    import tempfile
    from transformers import Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    assert len(vocab) <= MICRO_QWEN3["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vf, "w") as f:
            json.dump(vocab, f)
        with open(mf, "w") as f:
            f.write("#version: 0.2\n")
        tok = Qwen2Tokenizer(vf, mf, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(path)


def build(work: str, size: str = "micro") -> dict:
    """Write the models, tokenizer and dataset under ``work``; return their paths."""
    import torch
    from safetensors.torch import save_file

    install(size)
    from musubi_tuner.zimage import zimage_config as zc
    from musubi_tuner.zimage.zimage_model import ZImageTransformer2DModel
    from musubi_tuner.zimage.zimage_autoencoder import AutoencoderKL
    from transformers import Qwen3ForCausalLM
    from musubi_tuner.zimage import zimage_utils

    torch.manual_seed(0)
    os.makedirs(work, exist_ok=True)
    paths = {"dit": os.path.join(work, f"zimage_{size}_dit.safetensors"),
             "vae": os.path.join(work, "zimage_vae_random.safetensors"),
             "text_encoder": os.path.join(work, "qwen3_micro.safetensors"),
             "dataset_config": os.path.join(work, "dataset.toml")}

    if not os.path.exists(paths["dit"]):
        # the arguments create_model passes (zimage/zimage_model.py), on real memory instead of init_empty_weights
        dit = ZImageTransformer2DModel(
            all_patch_size=tuple(zc.DEFAULT_TRANSFORMER_PATCH_SIZE), all_f_patch_size=tuple(zc.DEFAULT_TRANSFORMER_F_PATCH_SIZE),
            in_channels=zc.DEFAULT_TRANSFORMER_IN_CHANNELS, dim=zc.DEFAULT_TRANSFORMER_DIM, n_layers=zc.DEFAULT_TRANSFORMER_N_LAYERS,
            n_refiner_layers=zc.DEFAULT_TRANSFORMER_N_REFINER_LAYERS, n_heads=zc.DEFAULT_TRANSFORMER_N_HEADS,
            n_kv_heads=zc.DEFAULT_TRANSFORMER_N_KV_HEADS, norm_eps=zc.DEFAULT_TRANSFORMER_NORM_EPS,
            qk_norm=zc.DEFAULT_TRANSFORMER_QK_NORM, cap_feat_dim=zc.DEFAULT_TRANSFORMER_CAP_FEAT_DIM,
            rope_theta=zc.ROPE_THETA, t_scale=zc.DEFAULT_TRANSFORMER_T_SCALE, axes_dims=zc.ROPE_AXES_DIMS,
            axes_lens=zc.ROPE_AXES_LENS, attn_mode="torch", split_attn=False)
        # the pad tokens are torch.empty in __init__ (a checkpoint fills them)
        torch.nn.init.normal_(dit.x_pad_token, std=0.02)
        torch.nn.init.normal_(dit.cap_pad_token, std=0.02)
        # fp32 on disk; musubi's trainer casts it to --mixed_precision's dtype (ZImageNetworkTrainer's dit_dtype)
        save_file({k: v.float().contiguous() for k, v in dit.state_dict().items()}, paths["dit"])
        del dit
    if not os.path.exists(paths["vae"]):
        # load_autoencoder_kl's arguments (zimage/zimage_autoencoder.py): the channels are fixed there
        vae = AutoencoderKL(
            in_channels=zc.DEFAULT_VAE_IN_CHANNELS, out_channels=zc.DEFAULT_VAE_OUT_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=zc.ZIMAGE_VAE_LATENT_CHANNELS,
            norm_num_groups=zc.DEFAULT_VAE_NORM_NUM_GROUPS, scaling_factor=zc.ZIMAGE_VAE_SCALING_FACTOR,
            shift_factor=zc.ZIMAGE_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=True)
        save_file({k: v.float().contiguous() for k, v in vae.state_dict().items()}, paths["vae"])
        del vae
    if not os.path.exists(paths["text_encoder"]):
        cfg = zimage_utils.Qwen3Config(model_type="qwen3", tie_word_embeddings=True)  # the micro sizes, via install()
        te = Qwen3ForCausalLM(cfg)
        # load_qwen3 ties lm_head to embed_tokens itself (and safetensors refuses shared tensors)
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in te.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, paths["text_encoder"])
        del te
    tok_dir = os.path.join(work, TOKENIZER_DIR)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
        _build_tokenizer(tok_dir)

    cache = micro_dataset.write(work, paths["dataset_config"])
    paths["cache_dir"] = cache
    return paths


def cache_commands(paths: dict) -> list:
    """musubi's own caching scripts, as (module, argv) pairs: the real VAE and Qwen3 code paths.
    (zimage_cache_latents always runs the VAE in fp32; its text encoder runs in bf16.)"""
    return [
        ("musubi_tuner.zimage_cache_latents",
         ["--dataset_config", paths["dataset_config"], "--vae", paths["vae"], "--device", "cpu"]),
        ("musubi_tuner.zimage_cache_text_encoder_outputs",
         ["--dataset_config", paths["dataset_config"], "--text_encoder", paths["text_encoder"], "--device", "cpu",
          "--batch_size", "1"]),
    ]


def train_args(paths: dict) -> list:
    """The family's part of the training command (the runner adds network, steps and output)."""
    return ["--dit", paths["dit"], "--dataset_config", paths["dataset_config"], "--sdpa", "--mixed_precision", "bf16",
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0"]


def train_module() -> str:
    return "musubi_tuner.zimage_train_network"


def load_dit(path: str, size: str = "micro"):
    """The DiT as musubi's trainer loads it with --mixed_precision bf16 (load_zimage_model, bf16, on the CPU)."""
    import torch

    install(size)
    from musubi_tuner.zimage.zimage_model import load_zimage_model

    return load_zimage_model("cpu", path, "torch", False, "cpu", torch.bfloat16)
