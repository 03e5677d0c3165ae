"""Presets, per-class/per-path overrides, excludes and block-wise control on diffusers' SD1.x UNet,
a CLIP text encoder and a model laid out like sd-scripts' SDXL UNet."""
import os

import pytest
import torch

import lycoris_kohya
from lycoris_kohya import presets
from lycoris_kohya.config import ConfigError

from sdxl_like import SdxlUNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny diffusers UNet (scripts/make_tiny_sd.py): 4 Transformer2DModel (proj_in/out 1x1 conv + 10 Linear
# each), 8 ResnetBlock2D (2 3x3 convs + time_emb_proj, 5 with a 1x1 shortcut), 1 down- and 1 upsampler,
# plus conv_in, conv_out and time_embedding.linear_1/2. CLIP: 2 layers x (q, k, v, out_proj, fc1, fc2).
SD1_COUNTS = {  # preset: (unet, text encoder)
    "default": (79, 12), "full": (83, 12), "full-lin": (50, 12), "attn-mlp": (48, 12), "attn-only": (32, 8),
    "unet-only": (79, 0), "unet-transformer-only": (48, 0), "unet-convblock-only": (31, 0), "ia3": (20, 6),
}
# the SDXL-like model (tests/sdxl_like.py): 7 resnets (14 3x3 convs, 7 emb Linear, 4 skips), 3 transformers
# (12 Linear each), Downsample2D.op, Upsample2D.conv, conv_in, out.2, time_embed x2, label_emb x2
SDXL_COUNTS = {
    "default": 63, "full": 69, "full-lin": 47, "attn-mlp": 36, "attn-only": 24,
    "unet-only": 63, "unet-transformer-only": 36, "unet-convblock-only": 27, "ia3": 15,
}


@pytest.mark.parametrize("preset", list(SD1_COUNTS))
def test_builtin_presets_on_diffusers_unet_and_clip(models, preset):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset=preset)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == SD1_COUNTS[preset]


@pytest.mark.parametrize("preset", list(SDXL_COUNTS))
def test_builtin_presets_on_sd_scripts_sdxl_layout(models, preset):
    te, _ = models
    from transformers import CLIPTextModelWithProjection

    unet = SdxlUNet2DConditionModel()
    net = lycoris_kohya.create_network(1.0, 4, 1, None, [te, CLIPTextModelWithProjection(te.config)], unet,
                                       preset=preset)
    assert len(net.unet_loras) == SDXL_COUNTS[preset]
    names = {a.lora_name for a in net.loras}
    if preset == "full":
        assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_label_emb_0_2"} <= names
    if preset == "attn-only":
        assert all("_attn1_" in n or "_attn2_" in n or "self_attn" in n for n in names)
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names


def test_preset_file_with_overrides_and_excludes(tmp_path):
    from sdxl_like import SdxlUNet2DConditionModel

    p = tmp_path / "mixed.toml"
    p.write_text('''
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = ["out.2"]
exclude_name = ["*.attn2.to_k", "*.attn2.to_v"]
[module_algo_map.ResnetBlock2D]
algo = "lokr"
dim = "16"
factor = 4
[name_algo_map."middle_block.*"]
algo = "loha"
dim = 2
alpha = 1
rank_dropout = 0.3
''')
    unet = SdxlUNet2DConditionModel()
    net = lycoris_kohya.create_network(1.0, 4, 2, None, [], unet, preset=str(p))
    by = {a.lora_name: a for a in net.loras}
    assert not any(n.endswith(("attn2_to_k", "attn2_to_v")) for n in by)
    assert by["lora_unet_out_2"].algo == "locon"
    res = by["lora_unet_input_blocks_1_0_in_layers_2"]
    assert res.algo == "lokr" and res.layout.rank == 16 and (res.layout.c, res.layout.d) == (2, 4)  # factor 4: 8 = 2*4
    assert by["lora_unet_input_blocks_2_1_proj_in"].algo == "locon" and by["lora_unet_input_blocks_2_1_proj_in"].rank == 4
    mid = [a for n, a in by.items() if n.startswith("lora_unet_middle_block_")]
    assert mid and all(a.algo == "loha" and a.rank == 2 and a._alpha_value == 1.0 for a in mid)
    assert all(a.rank_dropout == 0.3 for a in mid) and res.rank_dropout is None
    # the file reloads with its mixture of algorithms
    path = str(tmp_path / "mixed.safetensors")
    net.save_weights(path, torch.float32, {})
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, path, None, [], SdxlUNet2DConditionModel())
    assert {a.lora_name: a.algo for a in loaded.loras} == {n: a.algo for n, a in by.items()}


SHIPPED = os.path.join(ROOT, "lycoris_kohya", "preset_files")


def layers_under(model, classes):
    """{path: layer} of every Linear/Conv2d below a module of one of ``classes``, walked here
    from named_modules() (independently of the package's target selection)."""
    out = {}
    for path, m in model.named_modules():
        if type(m).__name__ in classes:
            for sub, layer in m.named_modules():
                if sub and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{path}.{sub}"] = layer
    return out


def key(path):
    return "lora_unet_" + path.replace(".", "_")


def test_shipped_preset_files_are_package_data():
    assert sorted(os.listdir(SHIPPED)) == ["attn-mlp-lokr-convs.toml", "style-no-cross-attn.toml"]
    assert presets.PRESET_DIR == SHIPPED
    assert not os.path.exists(os.path.join(ROOT, "configs", "presets"))


def test_shipped_attn_mlp_lokr_convs_sends_resnets_to_lokr(models):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, algo="loha", preset="attn-mlp-lokr-convs")
    by = {a.lora_name: a for a in net.unet_loras}
    resnet = layers_under(unet, ("ResnetBlock2D",))
    attn = layers_under(unet, ("Transformer2DModel",))
    samplers = layers_under(unet, ("Downsample2D", "Upsample2D"))
    assert set(by) == {key(p) for p in {**resnet, **attn, **samplers}}
    assert len(resnet) == 29 and len(net.text_encoder_loras) == 12
    for path in resnet:  # [module_algo_map.ResnetBlock2D]: algo lokr, dim 8, alpha 4, factor 4
        a = by[key(path)]
        t = a.export_tensors()
        full = "lokr_w2" in t  # both factors full (small tiny-SD convs): g = 1, alpha stored as 1
        assert a.algo == "lokr" and float(t["alpha"]) == (1.0 if full else 4.0), path
        w1 = t["lokr_w1"]
        assert w1.shape[0] <= 4 and w1.shape[1] <= 4, (path, w1.shape)  # factor 4: small sides <= 4
        if "lokr_w2_a" in t:
            assert t["lokr_w2_a"].shape[1] == 8, path
    for path in {**attn, **samplers}:  # the network's own options
        a = by[key(path)]
        assert (a.algo, a.rank, float(a.export_tensors()["alpha"])) == ("loha", 4, 1.0), path
    assert all(a.algo == "loha" and a.rank == 4 for a in net.text_encoder_loras)


@pytest.mark.parametrize("sdxl", [False, True])
def test_shipped_style_no_cross_attn_leaves_out_kv_and_te_and_raises_mid_rank(models, sdxl):
    te, unet = models
    if sdxl:
        unet, mid_prefix = SdxlUNet2DConditionModel(), "middle_block."
    else:
        mid_prefix = "mid_block."
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset="style-no-cross-attn")
    assert net.text_encoder_loras == []
    chosen = layers_under(unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"))
    kv = {p for p in chosen if p.endswith((".attn2.to_k", ".attn2.to_v"))}
    assert kv  # the exclusion is real on this model
    want = {p for p in chosen if p not in kv}
    by = {a.lora_name: a for a in net.unet_loras}
    assert set(by) == {key(p) for p in want}
    mids = [p for p in want if p.startswith(mid_prefix)]
    assert mids
    for p in want:
        a = by[key(p)]
        rank, alpha = (16, 8.0) if p.startswith(mid_prefix) else (4, 1.0)
        assert (a.rank, float(a.export_tensors()["alpha"])) == (rank, alpha), p


def test_preset_matching_nothing_is_an_error(models, tmp_path):
    te, unet = models
    p = tmp_path / "none.toml"
    p.write_text('unet_target_module = ["NoSuchBlock"]\ntext_encoder_target_module = []\n')
    with pytest.raises(ValueError, match="none.toml"):
        lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset=str(p))


@pytest.mark.parametrize("text,match", [
    ('unet_target_modul = ["X"]', "unet_target_modul"),
    ('[module_algo_map.ResnetBlock2D]\nalgo = "glora"', "algo"),
    ('[name_algo_map."x"]\npreset = "full"', "preset"),
    ('exclude_name = "x"\nenable_conv = "yes"', "enable_conv"),
])
def test_bad_preset_files_name_the_key(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        presets.load(str(p))


def test_unknown_preset_name_lists_builtin_and_shipped_names():
    with pytest.raises(ConfigError, match="no-such-preset") as e:
        presets.load("no-such-preset")
    for name in ("default", "attn-only", "ia3", "style-no-cross-attn", "attn-mlp-lokr-convs"):
        assert name in str(e.value)


def test_two_networks_with_different_presets_do_not_interfere(models):
    te, unet = models
    from diffusers import UNet2DConditionModel

    before = dict(presets.BUILTIN)
    a = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset="attn-only")
    unet2 = UNet2DConditionModel.from_config(unet.config)
    b = lycoris_kohya.create_network(1.0, 4, 1, None, None, unet2, preset="attn-mlp-lokr-convs")
    a2 = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset="attn-only")
    c = lycoris_kohya.create_network(1.0, 4, 1, None, None, unet2, preset="full")
    assert [x.lora_name for x in a.loras] == [x.lora_name for x in a2.loras]
    assert len(c.unet_loras) == 83 and len(a.unet_loras) == 32
    # b's per-class overrides (ResNet blocks -> LoKr) stay with b
    assert sum(x.algo == "lokr" for x in b.loras) == 29
    assert {x.algo for x in a2.loras} == {x.algo for x in c.loras} == {"locon"}
    assert presets.BUILTIN == before


# ----- block-wise -------------------------------------------------------------------------------
def test_block_dims_and_alphas_per_block(models):
    te, unet = models
    dims = ",".join(str(i % 4 + 1) for i in range(25))
    alphas = ",".join(str(float(i)) for i in range(25))
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, block_dims=dims, block_alphas=alphas,
                                       conv_block_dims=",".join(["2"] * 25))
    by = {a.lora_name: a for a in net.unet_loras}
    q = by["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]  # IN01 -> block 1
    assert (q.rank, q._alpha_value) == (2, 1.0)
    up = by["lora_unet_up_blocks_1_attentions_1_proj_in"]  # up block 1, attention 1: 3*1+1 -> 13 + 4 = 17
    assert (up.rank, up._alpha_value) == (17 % 4 + 1, 17.0)
    mid = by["lora_unet_mid_block_attentions_0_proj_out"]  # block 12
    assert (mid.rank, mid._alpha_value) == (12 % 4 + 1, 12.0)
    assert by["lora_unet_down_blocks_0_resnets_0_conv1"].rank == 2  # kxk: conv_block_dims
    assert all(a.rank == 4 for a in net.text_encoder_loras)  # text encoders keep network_dim
    with pytest.raises(ConfigError, match="block_dims has 3 entries"):
        lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, block_dims="1,2,3")


def test_block_lr_weights_make_groups_and_drop_zero_blocks(models):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, algo="loha", down_lr_weight="0,0.5,0.5,1",
                                       mid_lr_weight="2", up_lr_weight="zeros+0.25")
    groups, desc = net.prepare_optimizer_params(None, 1e-3, 1e-3)
    lrs = dict(zip(desc, (g["lr"] for g in groups)))
    assert lrs["unet_block1"] == pytest.approx(0.5e-3) and lrs["unet_block12"] == pytest.approx(2e-3)
    assert lrs["unet_block13"] == pytest.approx(0.25e-3) and lrs["textencoder"] == 1e-3
    zero = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0")
    assert not any("down_blocks" in a.lora_name for a in zero.unet_loras)
    assert any("up_blocks" in a.lora_name for a in zero.unet_loras)


def test_sdxl_block_indices():
    from lycoris_kohya.blocks import block_index

    assert block_index("lora_unet_input_blocks_2_1_proj_in", True) == 3
    assert block_index("lora_unet_middle_block_1_proj_in", True) == 11
    assert block_index("lora_unet_output_blocks_0_1_proj_in", True) == 13
    assert block_index("lora_unet_time_embed_0", True) == 0 and block_index("lora_unet_out_2", True) == 22
    unet = SdxlUNet2DConditionModel()
    net = lycoris_kohya.create_network(1.0, 4, 1, None, [], unet, block_dims=",".join(["3"] * 23))
    assert net.is_sdxl and all(a.rank == 3 for a in net.unet_loras if not a.geometry.is_kxk)


def test_mixed_algorithms_with_lokr_tucker_build(tmp_path, caplog):
    """A LoKr network whose preset sends some classes to LoCon still checks its LoKr modules only."""
    p = tmp_path / "mix.toml"
    p.write_text('unet_target_module = ["ResnetBlock2D", "Downsample2D"]\n'
                 '[module_algo_map.ResnetBlock2D]\nalgo = "locon"\n')  # the first module is LoCon
    unet = SdxlUNet2DConditionModel(c=16)
    net = lycoris_kohya.create_network(1.0, 2, 1, None, [], unet, algo="lokr", use_tucker="true", preset=str(p))
    assert {a.algo for a in net.loras} == {"locon", "lokr"}
    assert any(a.algo == "lokr" and a.layout.tucker for a in net.loras)
    assert "lokr_t2" in caplog.text


# ----- overrides are validated as network_args are ----------------------------------------------
@pytest.mark.parametrize("table,network_args,match", [
    # the example: LoKr-only options with another algorithm in the same override
    ('[module_algo_map.ResnetBlock2D]\nalgo = "loha"\nfactor = 4', {},
     r"module_algo_map.'ResnetBlock2D'.*factor applies to algo=lokr only, not algo=loha"),
    ('[name_algo_map."*.conv1"]\nalgo = "locon"\ndecompose_both = true', {"algo": "lokr"},
     r"name_algo_map.'\*.conv1'.*decompose_both applies to algo=lokr only, not algo=locon"),
    # no algo in the override: checked against the network's algorithm
    ('[module_algo_map.ResnetBlock2D]\nfull_matrix = true', {"algo": "loha"},
     r"module_algo_map.'ResnetBlock2D'.*full_matrix applies to algo=lokr only, not algo=loha"),
    # DoRA switched on per class in a bypass-mode network
    ('[module_algo_map.ResnetBlock2D]\ndora_wd = true', {"bypass_mode": "true"},
     r"module_algo_map.'ResnetBlock2D'.*bypass_mode and dora_wd cannot be combined"),
])
def test_override_errors_name_the_file_the_table_and_the_rule(models, tmp_path, table, network_args, match):
    te, unet = models
    p = tmp_path / "bad-override.toml"
    p.write_text('unet_target_module = ["ResnetBlock2D"]\n' + table + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset=str(p), **network_args)
    assert str(p) in str(e.value)
    # the same options as network_args give the same rule's message
    flat = dict(line.split(" = ") for line in table.splitlines()[1:])
    flat = {k: v.strip('"') for k, v in flat.items()}
    with pytest.raises(ConfigError, match=match.split(".*", 1)[1]):
        lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, **{**network_args, **flat})


def test_an_override_naming_its_algorithm_is_checked_even_if_it_matches_nothing(tmp_path):
    p = tmp_path / "unmatched.toml"
    p.write_text('[module_algo_map.NoSuchBlock]\nalgo = "loha"\nfactor = 4\n')
    with pytest.raises(ConfigError, match="unmatched.toml.*NoSuchBlock.*factor applies to algo=lokr only"):
        presets.load(str(p))


def test_override_warnings_name_the_table(models, tmp_path, caplog):
    te, unet = models
    p = tmp_path / "warn.toml"
    p.write_text('unet_target_module = ["ResnetBlock2D"]\n[module_algo_map.ResnetBlock2D]\nwd_on_output = true\n')
    lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset=str(p))
    assert "module_algo_map.'ResnetBlock2D'" in caplog.text and "wd_on_output has no effect" in caplog.text
    assert caplog.text.count("wd_on_output has no effect") == 1  # once, not once per layer


def test_a_later_table_may_change_the_algorithm(models, tmp_path):
    """A LoKr class override with factor, then a path override sending some of those layers to LoHa:
    each table is right at its own level (as network_args algo=lokr factor=8 with a LoHa override)."""
    te, unet = models
    p = tmp_path / "layered.toml"
    p.write_text('unet_target_module = ["ResnetBlock2D"]\n[module_algo_map.ResnetBlock2D]\nalgo = "lokr"\n'
                 'factor = 4\n[name_algo_map."mid_block.*"]\nalgo = "loha"\n')
    net = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, preset=str(p))
    algos = {a.lora_name.startswith("lora_unet_mid_block"): a.algo for a in net.unet_loras}
    assert algos == {True: "loha", False: "lokr"}
