"""SDXL as sdxl_train_network.py trains it: [te1, te2] with lora_te1_/lora_te2_ keys and a learning
rate each, the U-Net under sd-scripts' own (SGM) module paths, the text_time conditioning, files
marked as SDXL; then the smoke train's reload and merge checks (scripts/smoke_train.py --sdxl)."""
import pytest
import torch
from safetensors import safe_open

import lycoris_kohya
import smoke_train

CLIP_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def sd_scripts_sdxl_unet_keys(depth1, depth2):
    """The default preset's keys on sd-scripts' SdxlUNet2DConditionModel, written out from
    library/sdxl_original_unet.py's __init__ (transformer depth depth1 at level 1, depth2 at level 2;
    SDXL has 2 and 10). Resnets: in_layers.2, emb_layers.1, out_layers.3, skip_connection when the
    widths differ; transformers: proj_in/out and per block attn1/attn2 q/k/v/out, ff.net.0.proj,
    ff.net.2; Downsample2D.op; Upsample2D.conv."""
    keys = []

    def resnet(path, skip):
        keys.extend(f"{path}_{n}" for n in ("in_layers_2", "emb_layers_1", "out_layers_3"))
        if skip:
            keys.append(f"{path}_skip_connection")

    def transformer(path, depth):
        keys.extend((f"{path}_proj_in", f"{path}_proj_out"))
        for k in range(depth):
            b = f"{path}_transformer_blocks_{k}"
            keys.extend(f"{b}_{a}_{x}" for a in ("attn1", "attn2") for x in ("to_q", "to_k", "to_v", "to_out_0"))
            keys.extend((f"{b}_ff_net_0_proj", f"{b}_ff_net_2"))

    u = "lora_unet"
    for n in (1, 2):  # level 0: c -> c, no attention
        resnet(f"{u}_input_blocks_{n}_0", False)
    keys.append(f"{u}_input_blocks_3_0_op")
    for n, depth in ((4, depth1), (5, depth1), (7, depth2), (8, depth2)):
        resnet(f"{u}_input_blocks_{n}_0", n in (4, 7))  # the first block of a level widens
        transformer(f"{u}_input_blocks_{n}_1", depth)
    keys.append(f"{u}_input_blocks_6_0_op")
    resnet(f"{u}_middle_block_0", False)
    transformer(f"{u}_middle_block_1", depth2)
    resnet(f"{u}_middle_block_2", False)
    for n in range(9):  # every output block concatenates a skip: widths always differ
        resnet(f"{u}_output_blocks_{n}_0", True)
        if n < 6:
            transformer(f"{u}_output_blocks_{n}_1", depth2 if n < 3 else depth1)
        if n in (2, 5):
            keys.append(f"{u}_output_blocks_{n}_2_conv")
    return set(keys)


def te_keys(prefix, layers=2):
    return {f"{prefix}_text_model_encoder_layers_{i}_{n}" for i in range(layers) for n in CLIP_LINEARS}


def test_the_written_out_layout_has_the_real_trainers_module_count():
    # sdxl_train_network.py on a full-layout SDXL U-Net (kohya-run --sdxl, LoKr+DoRA, this plugin):
    # 872 modules = 84 text encoder (12 + 2 CLIP layers x 6) + 788 U-Net
    assert len(sd_scripts_sdxl_unet_keys(2, 10)) == 788


def test_keys_are_the_ones_sdxl_train_network_writes(sdxl_models):
    tes, unet, _ = sdxl_models
    net = lycoris_kohya.create_network(1.0, 4, 1.0, None, tes, unet, algo="locon")
    assert net.is_sdxl
    assert {a.lora_name for a in net.unet_loras} == sd_scripts_sdxl_unet_keys(1, 2)
    assert {a.lora_name for a in net.text_encoder_loras} == te_keys("lora_te1") | te_keys("lora_te2")
    # the adapters hook the diffusers U-Net's own layers: the view shares them
    assert net.lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.layer is \
        unet.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert net.lora_unet_input_blocks_3_0_op.layer is unet.unet.down_blocks[0].downsamplers[0].conv
    assert net.lora_unet_output_blocks_2_2_conv.layer is unet.unet.up_blocks[0].upsamplers[0].conv


def test_one_learning_rate_per_text_encoder(sdxl_models):
    tes, unet, _ = sdxl_models
    net = lycoris_kohya.create_network(1.0, 4, 1.0, None, tes, unet, algo="loha")
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 5e-5], 2e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-5, 2e-4]
    for group, prefix in zip(groups, ("lora_te1_", "lora_te2_", "lora_unet_")):
        want = {id(p) for a in net.loras if a.lora_name.startswith(prefix) for p in a.parameters()}
        assert {id(p) for p in group["params"]} == want


def test_sdxl_files_say_sdxl(sdxl_models, models, tmp_path):
    tes, unet, _ = sdxl_models
    net = lycoris_kohya.create_network(1.0, 4, 1.0, None, tes, unet, algo="lokr")

    def version(path):
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("ss_base_model_version")

    net.save_weights(str(tmp_path / "none.safetensors"), torch.float16, None)
    assert version(tmp_path / "none.safetensors") == "sdxl_base_v1-0"
    net.save_weights(str(tmp_path / "other.safetensors"), None, {"ss_network_dim": "4"})
    assert version(tmp_path / "other.safetensors") == "sdxl_base_v1-0"
    net.save_weights(str(tmp_path / "given.safetensors"), None, {"ss_base_model_version": "sdxl_refiner_v1-0"})
    assert version(tmp_path / "given.safetensors") == "sdxl_refiner_v1-0"  # the trainer's word wins
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, str(tmp_path / "none.safetensors"), None, tes, unet)
    loaded.save_weights(str(tmp_path / "again.safetensors"), None, None)
    assert version(tmp_path / "again.safetensors") == "sdxl_base_v1-0"

    te, sd_unet = models  # SD1.x: nothing is added
    sd1 = lycoris_kohya.create_network(1.0, 4, 1.0, None, te, sd_unet, algo="lokr")
    sd1.save_weights(str(tmp_path / "sd1.safetensors"), None, None)
    assert version(tmp_path / "sd1.safetensors") is None


@pytest.mark.slow  # the smoke train, end to end
@pytest.mark.parametrize("args", [["algo=lokr", "dora_wd=true"], ["algo=loha", "conv_dim=2", "use_tucker=true"]])
def test_sdxl_smoke_train(tiny_sdxl, tmp_path, args, capsys):
    rc = smoke_train.main(["--sdxl", "--model", tiny_sdxl, "--steps", "3", "--output_dir", str(tmp_path),
                           "--output_name", "xl", "--text_encoder_lr", "4e-4", "1e-4", "--network_args", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "groups ['textencoder 1', 'textencoder 2', 'unet']" in out
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
    assert modules == sd_scripts_sdxl_unet_keys(1, 2) | te_keys("lora_te1") | te_keys("lora_te2")
