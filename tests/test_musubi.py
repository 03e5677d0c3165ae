"""kohya-ss/musubi-tuner's network protocol and model families, on the miniatures of tests/musubi_like.py
(musubi's class names and module paths; musubi-tuner is not a dependency).

The trainer's calls are written out here in the order and with the arguments of musubi's
training/trainer_base.py (``_build_network``, ``_build_optimizer_and_dataloader``, the training loop).
Expected key names follow musubi's own rule (networks/lora.py: ``"lora_unet" + "." + path`` with dots
made underscores, every Linear under the target classes of networks/lora_<family>.py that no default
exclude pattern matches); merges are checked against the closed forms of tests/oracle.py."""
import importlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoris_kohya
from lycoris_kohya import kohya, presets
from lycoris_kohya import targets as tg
from lycoris_kohya.config import ConfigError

import musubi_like as ml
from conftest import randomize
from flux_like import Flux as SdScriptsFlux
from oracle import column_norm, reference_delta, row_norm, trained_weight

FAMILY_OF = {"wan_i2v": "wan", "hidream_o1_i2i": "hidream_o1"}  # miniature -> family, where the names differ
MODELS = list(ml.BUILDERS)


# ----- musubi's LoRA naming, written out per family (miniature depths) ------------------------------
def _at(prefix, n, leaves):
    return {f"lora_unet_{prefix}_{i}_{leaf}" for i in range(n) for leaf in leaves}


def _sides(leaves):
    return [f"{side}_{leaf}" for side in ("img", "txt") for leaf in leaves]


_WAN = ["self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o", "cross_attn_q", "cross_attn_k", "cross_attn_v",
        "cross_attn_o", "ffn_0", "ffn_2"]
_JOINT_ATTN = ["attn_to_q", "attn_to_k", "attn_to_v", "attn_add_k_proj", "attn_add_v_proj", "attn_add_q_proj",
               "attn_to_out_0", "attn_to_add_out"]
_FLUX = _at("double_blocks", 2, _sides(["attn_qkv", "attn_proj", "mlp_0", "mlp_2"])) | _at("single_blocks", 2, ["linear1", "linear2"])
_KREA_BLOCK = ["attn_wq", "attn_wk", "attn_wv", "attn_gate", "attn_wo", "mlp_gate", "mlp_up", "mlp_down"]
_HIDREAM_T2I = (_at("model_language_model_layers", 2, ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                                       "self_attn_o_proj", "mlp_gate_proj", "mlp_up_proj", "mlp_down_proj"])
                | {"lora_unet_model_x_embedder_proj1", "lora_unet_model_x_embedder_proj2", "lora_unet_model_final_layer2_linear"})
_KANDINSKY_ATTN = ["to_query", "to_key", "to_value", "out_layer"]

MUSUBI_KEYS = {
    "wan": _at("blocks", 2, _WAN),
    "wan_i2v": _at("blocks", 2, _WAN + ["cross_attn_k_img", "cross_attn_v_img"]),
    # lora_qwen_image's ".*(_mod_).*" matches no path: img_mod.1 / txt_mod.1 are in
    "qwen_image": _at("transformer_blocks", 2, ["img_mod_1"] + _JOINT_ATTN + ["img_mlp_net_0_proj", "img_mlp_net_2",
                                                                             "txt_mod_1", "txt_mlp_net_0_proj", "txt_mlp_net_2"]),
    "zimage": _at("layers", 2, ["attention_to_q", "attention_to_k", "attention_to_v", "attention_to_out_0",
                                "feed_forward_w1", "feed_forward_w2", "feed_forward_w3"]),
    "flux2": _FLUX,
    "flux_kontext": _FLUX,
    "hunyuan_video": (_at("double_blocks", 2, _sides(["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2"]))
                      | _at("single_blocks", 2, ["linear1", "linear2"])),
    "hunyuan_video_1_5": _at("double_blocks", 2, _sides(["mod_linear", "attn_q", "attn_k", "attn_v", "attn_proj",
                                                          "mlp_fc1", "mlp_fc2"])),
    "framepack": (_at("transformer_blocks", 2, _JOINT_ATTN + ["ff_net_0_proj", "ff_net_2", "ff_context_net_0_proj",
                                                               "ff_context_net_2"])
                  | _at("single_transformer_blocks", 2, ["attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp", "proj_out"])),
    "kandinsky5": (_at("text_transformer_blocks", 1, [f"self_attention_{p}" for p in _KANDINSKY_ATTN]
                       + ["feed_forward_in_layer", "feed_forward_out_layer"])
                   | _at("visual_transformer_blocks", 2, [f"{a}_{p}" for a in ("self_attention", "cross_attention")
                                                          for p in _KANDINSKY_ATTN]
                         + ["feed_forward_in_layer", "feed_forward_out_layer"])),
    # lora_krea2: every Linear of the model
    "krea2": (_at("blocks", 2, _KREA_BLOCK) | _at("txtfusion_layerwise_blocks", 1, _KREA_BLOCK)
              | _at("txtfusion_refiner_blocks", 1, _KREA_BLOCK)
              | {f"lora_unet_{p}" for p in ("first", "tmlp_0", "tmlp_2", "txtfusion_projector", "txtmlp_1", "txtmlp_3",
                                             "last_linear", "tproj_1")}),
    "ideogram4": _at("layers", 2, ["attention_qkv", "attention_o", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3"]),
    "hidream_o1": _HIDREAM_T2I,
    "hidream_o1_i2i": (_HIDREAM_T2I | _at("model_visual_blocks", 1, ["attn_qkv", "attn_proj", "mlp_linear_fc1", "mlp_linear_fc2"])
                       | {"lora_unet_model_visual_merger_linear_fc1", "lora_unet_model_visual_merger_linear_fc2"}),
}

#: one layer per family: its module path and the key musubi's own networks.lora_<family> saves it under
#: (read off musubi's LoRA on its real classes: the same rule, checked there for every layer)
ONE_KEY = {
    "wan": ("blocks.1.cross_attn.k", "lora_unet_blocks_1_cross_attn_k"),
    "wan_i2v": ("blocks.0.cross_attn.k_img", "lora_unet_blocks_0_cross_attn_k_img"),
    "qwen_image": ("transformer_blocks.0.img_mlp.net.0.proj", "lora_unet_transformer_blocks_0_img_mlp_net_0_proj"),
    "zimage": ("layers.1.attention.to_out.0", "lora_unet_layers_1_attention_to_out_0"),
    "flux2": ("single_blocks.1.linear1", "lora_unet_single_blocks_1_linear1"),
    "flux_kontext": ("double_blocks.0.txt_attn.qkv", "lora_unet_double_blocks_0_txt_attn_qkv"),
    "hunyuan_video": ("double_blocks.1.img_attn_qkv", "lora_unet_double_blocks_1_img_attn_qkv"),
    "hunyuan_video_1_5": ("double_blocks.0.txt_mod.linear", "lora_unet_double_blocks_0_txt_mod_linear"),
    "framepack": ("single_transformer_blocks.0.proj_out", "lora_unet_single_transformer_blocks_0_proj_out"),
    "kandinsky5": ("visual_transformer_blocks.1.cross_attention.to_key",
                   "lora_unet_visual_transformer_blocks_1_cross_attention_to_key"),
    "krea2": ("txtfusion.projector", "lora_unet_txtfusion_projector"),
    "ideogram4": ("layers.0.attention.qkv", "lora_unet_layers_0_attention_qkv"),
    "hidream_o1": ("model.language_model.layers.1.mlp.down_proj", "lora_unet_model_language_model_layers_1_mlp_down_proj"),
    "hidream_o1_i2i": ("model.visual.merger.linear_fc2", "lora_unet_model_visual_merger_linear_fc2"),
}

#: modules per preset on the miniatures, from their structure (musubi_like's docstrings): default / full
#: (every Linear; Conv3d embeddings are not adapted) / attn-mlp / attn-only (/ default-i2i for HiDream-O1)
COUNTS = {
    "wan": (20, 26, 20, 16), "wan_i2v": (24, 32, 24, 20),
    "qwen_image": (28, 34, 24, 16), "zimage": (14, 37, 14, 8), "flux2": (20, 31, 20, 8), "flux_kontext": (20, 36, 20, 8),
    "hunyuan_video": (20, 44, 20, 8), "hunyuan_video_1_5": (28, 47, 24, 16), "framepack": (34, 62, 34, 22),
    "kandinsky5": (26, 36, 26, 20), "krea2": (40, 40, 16, 10), "ideogram4": (10, 19, 10, 4),
    "hidream_o1": (17, 25, 14, 8, 23), "hidream_o1_i2i": (17, 25, 14, 8, 23),
}
#: the same at the released depths (musubi_like.REAL_DEPTH), built on the meta device; default equals the
#: number of modules musubi's own LoRA creates on its real classes (Wan 2.1 T2V 14B, I2V 14B, Qwen-Image,
#: Z-Image, FLUX.2 dev, FLUX.1 Kontext dev, HunyuanVideo, HunyuanVideo 1.5, FramePack, Kandinsky 5 Lite T2I,
#: Krea 2, Ideogram 4, HiDream-O1 on transformers' default Qwen3-VL config), as do full/attn-mlp/attn-only
REAL_COUNTS = {
    "wan": (400, 406, 400, 320), "wan_i2v": (480, 488, 480, 400),
    "qwen_image": (840, 846, 720, 480), "zimage": (210, 276, 210, 120), "flux2": (160, 171, 160, 32),
    "flux_kontext": (228, 314, 228, 76), "hunyuan_video": (240, 343, 240, 80), "hunyuan_video_1_5": (756, 780, 648, 432),
    "framepack": (440, 549, 440, 280), "kandinsky5": (512, 571, 512, 408), "krea2": (264, 264, 224, 140),
    "ideogram4": (170, 211, 170, 68), "hidream_o1": (227, 339, 224, 128, 337), "hidream_o1_i2i": (227, 339, 224, 128, 337),
}
PRESETS = ("default", "full", "attn-mlp", "attn-only", "default-i2i")


def names(net):
    return {a.lora_name for a in net.loras}


def arch(model, **kw):
    return lycoris_kohya.create_arch_network(1.0, 4, 2.0, None, None, model, **kw)


def linear_by_key(model):
    return {"lora_unet_" + p.replace(".", "_"): m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


# ----- families and keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_default_keys_are_what_musubis_own_lora_writes(model):
    net = arch(ml.build(model))
    assert net.family.name == FAMILY_OF.get(model, model) and net.family.trainer == "musubi"
    assert names(net) == MUSUBI_KEYS[model]
    assert not net.text_encoder_loras


@pytest.mark.parametrize("model", MODELS)
def test_one_layer_per_family_has_musubis_key(model):
    t = ml.build(model)
    path, key = ONE_KEY[model]
    adapters = {a.lora_name: a for a in arch(t).loras}
    assert adapters[key].layer is t.get_submodule(path)


@pytest.mark.parametrize("model", MODELS)
def test_module_counts_per_preset(model):
    want = dict(zip(PRESETS, COUNTS[model]))
    got = {p: len(arch(ml.build(model), preset=p).unet_loras) for p in want}
    assert got == want


@pytest.mark.parametrize("model", MODELS)
def test_module_counts_at_the_released_depth(model):
    """The layers each preset selects (what create_arch_network builds adapters for: test_module_counts_per_preset)."""
    want = dict(zip(PRESETS, REAL_COUNTS[model]))
    t = ml.build(model, real=True)  # meta device: no memory, no init
    with tg.calling_trainer(tg.MUSUBI):
        family = tg.detect_family(t)
        got = {p: len(tg.select(None, t, presets.load(p, family.name), family)[1]) for p in want}
        assert tg.default_preset(family, t) == ("default-i2i" if model == "hidream_o1_i2i" else "default")
    assert got == want


def test_presets_mean_what_they_say():
    full = names(arch(ml.build("wan_i2v"), preset="full"))
    assert {"lora_unet_text_embedding_0", "lora_unet_time_projection_1", "lora_unet_head_head",
            "lora_unet_img_emb_proj_3"} <= full and "lora_unet_patch_embedding" not in full  # a Conv3d
    qwen = names(arch(ml.build("qwen_image"), preset="attn-mlp"))
    assert qwen == {k for k in MUSUBI_KEYS["qwen_image"] if "_mod_1" not in k}
    only = names(arch(ml.build("framepack"), preset="attn-only"))
    assert only and all("_attn_" in k for k in only) and not any("refiner" in k for k in only)
    assert names(arch(ml.build("krea2"), preset="attn-only")) == _at("blocks", 2, _KREA_BLOCK[:5])
    hidream = names(arch(ml.build("hidream_o1"), preset="full"))
    assert "lora_unet_lm_head" not in hidream and "lora_unet_model_t_embedder1_mlp_0" in hidream
    # an explicit preset wins over the i2i default of a model tagged for image-to-image training
    assert len(arch(ml.build("hidream_o1_i2i"), preset="attn-only").unet_loras) == 8
    with pytest.raises(ConfigError, match=r"preset='ia3' is not defined for this model family \(wan\).*attn-only"):
        arch(ml.build("wan"), preset="ia3")


def test_a_flux_class_is_kontext_for_musubi_and_flux_for_sd_scripts():
    """Both trainers name their FLUX.1 class Flux: musubi's lora_flux leaves img_/txt_mod.lin and
    modulation.lin out, sd-scripts' lora_flux keeps them; the entry point says who calls."""
    mod = {f"lora_unet_double_blocks_{i}_{s}_mod_lin" for i in range(2) for s in ("img", "txt")}
    mod |= {f"lora_unet_single_blocks_{i}_modulation_lin" for i in range(2)}
    for model in (ml.build("flux_kontext"), SdScriptsFlux()):
        musubi = arch(model)
        assert musubi.family.name == "flux_kontext" and names(musubi) == MUSUBI_KEYS["flux_kontext"]
        sd_scripts = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, model)
        assert sd_scripts.family.name == "flux" and names(sd_scripts) == MUSUBI_KEYS["flux_kontext"] | mod


def test_an_unknown_model_says_what_is_known_and_how_to_target_it(tmp_path):
    t = ml.node("MyDiT", blocks=nn.ModuleList([ml.node("MyBlock", q=ml.L(), mod=ml.L())]), head=ml.L())
    with pytest.raises(ValueError) as e:
        arch(t)
    msg = str(e.value)
    assert "MyDiT" in msg and "MyBlock" not in msg and "ModuleList" in msg
    for known in ("Wan 2.1/2.2 (WanModel)", "Qwen-Image", "FLUX.1 Kontext (Flux)", "HiDream-O1", "Krea 2"):
        assert known in msg
    assert "preset=" in msg and "unet_target_module" in msg and "0 modules" not in msg
    preset = tmp_path / "dit.toml"
    preset.write_text('unet_target_module = ["MyBlock"]\nexclude_name = ["*.mod"]\n')
    net = arch(t, preset=str(preset))
    assert names(net) == {"lora_unet_blocks_0_q"} and net.family.name == "other_dit"
    with pytest.raises(ConfigError, match="not defined for this model family"):
        arch(t, preset="attn-only")


def test_musubis_own_pattern_args_point_to_presets():
    with pytest.raises(ConfigError, match=r"exclude_patterns is an option of musubi-tuner's own networks.lora.*exclude_name"):
        arch(ml.build("wan"), exclude_patterns="['.*ffn.*']")


# ----- the protocol, as trainer_base.py calls it ---------------------------------------------------
class Args:
    """The few musubi args the network sees (trainer_base passes the Namespace to prepare_network)."""
    network_dim, network_alpha, network_dropout, learning_rate, max_grad_norm = 4, 2.0, None, 1e-2, 1.0
    scale_weight_norms = 10.0


def build_network(module, transformer, args, network_args, dim_from_weights=None):
    """trainer_base._build_network after the --base_weights merge."""
    if dim_from_weights is not None:
        network, _ = module.create_arch_network_from_weights(1, dim_from_weights, unet=transformer)
    elif hasattr(module, "create_arch_network"):
        network = module.create_arch_network(1.0, args.network_dim, args.network_alpha, None, None, transformer,
                                             neuron_dropout=args.network_dropout, **network_args)
    else:
        network = module.create_network(1.0, args.network_dim, args.network_alpha, None, None, transformer, **network_args)
    if hasattr(module, "prepare_network"):  # musubi asks the module, then calls the network
        network.prepare_network(args)
    network.apply_to(None, transformer, apply_text_encoder=False, apply_unet=True)
    network.enable_gradient_checkpointing()
    return network


def train(module, network, transformer, args, steps=2):
    """_build_optimizer_and_dataloader, _prepare_with_accelerator and the training loop; one "step"
    runs every adapted layer on random input (the miniatures have no forward)."""
    params, descriptions = network.prepare_optimizer_params(unet_lr=args.learning_rate)
    optimizer = torch.optim.AdamW(params)
    network.prepare_grad_etc(transformer)
    network.on_epoch_start(transformer)
    g = torch.Generator().manual_seed(0)
    logs = []
    for _ in range(steps):
        network.on_step_start()
        loss = 0.0
        for a in network.unet_loras:
            x = torch.randn(2, a.layer.in_features, generator=g)
            loss = loss + (a.layer(x) - 1.0).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs.append(network.apply_max_norm_regularization(args.scale_weight_norms, "cpu"))
    return descriptions, logs


def locon_merged(sd, key, w0, m):
    down, up = sd[key + ".lora_down.weight"].float(), sd[key + ".lora_up.weight"].float()
    return w0 + m * float(sd[key + ".alpha"]) / down.shape[0] * (up @ down)


@pytest.mark.parametrize("model", MODELS)
def test_training_run_in_musubis_order(model, tmp_path):
    module = importlib.import_module("lycoris_kohya")  # --network_module=lycoris_kohya
    args = Args()
    t = ml.build(model)
    before = {k: layer.weight.detach().clone() for k, layer in linear_by_key(t).items()}
    network = build_network(module, t, args, {"loraplus_lr_ratio": "4"})
    descriptions, logs = train(module, network, t, args)
    assert descriptions == ["unet", "unet plus"]
    assert all(type(n) is int and type(a) is float and type(b) is float for n, a, b in logs)
    assert all(torch.equal(layer.weight, before[k]) for k, layer in linear_by_key(t).items())  # W0 untouched
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, torch.bfloat16, {"ss_network_module": "lycoris_kohya"})
    sd = load_file(path)
    assert {k.split(".")[0] for k in sd} == MUSUBI_KEYS[model]
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_up" in k)  # it trained

    # --dim_from_weights: the pair musubi unpacks, then the same build; the layout and values are the file's
    t2 = ml.build(model)
    resumed = build_network(module, t2, args, {}, dim_from_weights=sd)
    assert names(resumed) == MUSUBI_KEYS[model]
    assert all(torch.equal(v.float(), sd[k].float()) for k, v in resumed.export_state_dict().items())
    train(module, resumed, t2, args, steps=1)

    # --base_weights: the same function's result used as a network
    t3 = ml.build(model)
    w0 = {k: layer.weight.detach().clone() for k, layer in linear_by_key(t3).items()}
    module.create_arch_network_from_weights(0.5, sd, unet=t3, for_inference=True).merge_to(
        None, t3, sd, torch.float32, "cpu")
    for key, layer in linear_by_key(t3).items():
        want = locon_merged(sd, key, w0[key], 0.5) if key in MUSUBI_KEYS[model] else w0[key]
        assert torch.allclose(layer.weight, want, atol=1e-6), key


def test_from_weights_is_a_network_and_a_pair():
    t = ml.build("wan")
    sd = randomize(arch(t), seed=3).export_state_dict()
    net = kohya.create_arch_network_from_weights(1.0, sd, unet=ml.build("wan"))
    assert isinstance(net, lycoris_kohya.LycorisNetwork) and callable(net.merge_to)
    again, weights = net
    assert again is net and set(weights) == set(sd)
    assert all(torch.equal(weights[k], sd[k]) for k in sd)
    assert dict(zip(("network", "weights"), net))["network"] is net  # unpacks more than once
    with pytest.raises(TypeError, match="unet="):
        kohya.create_arch_network_from_weights(1.0, sd)
    # musubi's merge_lora.py / *_generate_*.py call merge_to this way
    t = ml.build("wan")
    w0 = t.blocks[0].ffn[2].weight.detach().clone()
    net = kohya.create_arch_network_from_weights(1.0, sd, unet=t, for_inference=True)
    net.merge_to(None, t, sd, device="cpu", non_blocking=True)
    assert torch.allclose(t.blocks[0].ffn[2].weight, locon_merged(sd, "lora_unet_blocks_0_ffn_2", w0, 1.0), atol=1e-6)


def test_sd_scripts_calls_are_unchanged():
    """create_network / create_network_from_weights keep sd-scripts' (network, weights_sd) tuple and
    two-argument hooks; the one-argument forms are musubi's."""
    t = ml.build("wan")
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, t)
    net.prepare_grad_etc(None, t)
    net.on_epoch_start(None, t)
    net.on_step_start(None, t)
    sd = randomize(net, seed=1).export_state_dict()
    pair = lycoris_kohya.create_network_from_weights(1.0, None, None, None, ml.build("wan"), weights_sd=sd)
    assert type(pair) is tuple and pair[1] is sd and type(pair[0]) is lycoris_kohya.LycorisNetwork


# ----- every algorithm: save -> reload -> merge ------------------------------------------------------
ALGOS = {"locon": {"algo": "locon"}, "loha": {"algo": "loha"}, "lokr": {"algo": "lokr", "factor": "4"},
         "locon_dora": {"algo": "locon", "dora_wd": "true"}}
CASES = [("wan_i2v", v) for v in ALGOS] + [(m, "lokr") for m in ("krea2", "hunyuan_video_1_5", "hidream_o1_i2i")]


@pytest.mark.parametrize("model,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_every_algorithm_saves_reloads_and_merges(model, variant, tmp_path):
    net = arch(ml.build(model), **ALGOS[variant])
    randomize(net, seed=2, std=0.05)
    with torch.no_grad():
        for a in net.loras:
            if a.dora_axis is not None:  # magnitudes near ||W0||, as after some training
                norm = column_norm(a.layer.weight) if a.dora_axis == "input" else row_norm(a.layer.weight)
                a.dora_scale.copy_(norm * (1 + 0.1 * torch.rand(a.dora_scale.shape)))
    path = str(tmp_path / "f.safetensors")
    net.save_weights(path, torch.float32, None)
    sd = load_file(path)
    assert {k.split(".")[0] for k in sd} == MUSUBI_KEYS[model]
    assert any(k.endswith(".dora_scale") for k in sd) == (variant == "locon_dora")

    t = ml.build(model)
    loaded = kohya.create_arch_network_from_weights(1.0, path, unet=t)  # a path works too
    for a, b in zip(net.loras, loaded.loras):
        assert a.lora_name == b.lora_name and a.algo == b.algo and a.dora_axis == b.dora_axis
        assert torch.allclose(a.delta(), b.delta(), atol=1e-6)

    w0 = {k: layer.weight.detach().clone() for k, layer in linear_by_key(t).items()}
    merger, _ = kohya.create_arch_network_from_weights(0.7, sd, unet=t, for_inference=True)
    merger.merge_to(None, t, sd, torch.float32, "cpu")
    for key, layer in linear_by_key(t).items():
        if key not in MUSUBI_KEYS[model]:
            assert torch.equal(layer.weight, w0[key])
            continue
        g, dw = reference_delta(sd, key, w0[key].shape)
        if key + ".dora_scale" in sd:
            want = trained_weight(w0[key], g, dw, sd[key + ".dora_scale"], 0.7, "input")
        else:
            want = w0[key] + 0.7 * g * dw
        assert torch.allclose(layer.weight, want, atol=1e-5), key
