"""Flux, SD3 and the other DiTs sd-scripts trains, on miniatures with sd-scripts' class names and module
paths (tests/flux_like.py, sd3_like.py, dit_like.py). Expected key names are written here from sd-scripts'
own rule for each family (networks/lora_flux.py, lora_sd3.py, lora_lumina.py, lora_anima.py,
lora_hunyuan_image.py: ``prefix + "." + path`` with dots made underscores, every Linear under the target
classes; CLIP-L ``lora_te1``, CLIP-G ``lora_te2``, T5-XXL ``lora_te3`` only with train_t5xxl).
Deltas, merges and norms are checked against the closed forms of tests/test_algorithms.py and test_dora.py."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoris_kohya
from lycoris_kohya.config import ConfigError

import dit_like
from conftest import randomize
from flux_like import Flux, clip_l, flux_models, t5xxl
from sd3_like import sd3_models
from test_algorithms import reference_delta
from test_dora import column_norm, row_norm, trained_weight


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----- expected names, from sd-scripts' rules ------------------------------------------------------
FLUX_DOUBLE = ("img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
               "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
FLUX_SINGLE = ("linear1", "linear2", "modulation_lin")
CLIP_LEAVES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
T5_LEAVES = ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v", "layer_0_SelfAttention_o",
             "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1", "layer_1_DenseReluDense_wo")


def clip_keys(prefix, layers=2):
    return {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in CLIP_LEAVES}


def t5_keys(layers=2):
    return {f"lora_te3_encoder_block_{i}_{leaf}" for i in range(layers) for leaf in T5_LEAVES}


def flux_dit_keys(double=2, single=2):
    return ({f"lora_unet_double_blocks_{i}_{leaf}" for i in range(double) for leaf in FLUX_DOUBLE}
            | {f"lora_unet_single_blocks_{i}_{leaf}" for i in range(single) for leaf in FLUX_SINGLE})


def sd3_dit_keys():
    keys = set()
    for i in range(3):
        for side in ("context_block", "x_block"):
            leaves = ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"]
            if (i, side) == (2, "context_block"):  # pre_only: no attn.proj, no mlp
                leaves = ["attn_qkv", "adaLN_modulation_1"]
            if (i, side) == (0, "x_block"):  # x_block_self_attn (SD3.5)
                leaves += ["attn2_qkv", "attn2_proj"]
            keys |= {f"lora_unet_joint_blocks_{i}_{side}_{leaf}" for leaf in leaves}
    return keys


def names(net):
    return {a.lora_name for a in net.loras}


def make(models, **kw):
    tes, dit = models
    args = {"algo": "locon"}
    args.update(kw)
    return lycoris_kohya.create_network(1.0, 4, 2.0, None, tes, dit, **args)


# ----- names ---------------------------------------------------------------------------------------
def test_flux_keys_are_what_lora_flux_writes():
    net = make(flux_models())
    assert names(net) == flux_dit_keys() | clip_keys("lora_te1")
    assert net.train_t5xxl is False
    with_t5 = make(flux_models(), train_t5xxl="True")
    assert names(with_t5) == flux_dit_keys() | clip_keys("lora_te1") | t5_keys()
    assert with_t5.train_t5xxl is True


def test_fused_qkv_and_linear1_stay_one_module_with_one_alpha():
    tes, dit = flux_models()
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, tes, dit)
    sd = net.export_state_dict()
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (48, 4)  # 3 x hidden 16
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (16 * 3 + 32, 4)  # qkv + MLP in
    assert sd["lora_unet_single_blocks_0_linear1.alpha"].item() == 2.0
    assert not any(".lora_down.0" in k or ".lora_up.1" in k for k in sd)  # no split_qkv sub-tensors


def test_sd3_keys_are_what_lora_sd3_writes():
    net = make(sd3_models())
    assert names(net) == sd3_dit_keys() | clip_keys("lora_te1") | clip_keys("lora_te2")
    with_t5 = make(sd3_models(), train_t5xxl="true")
    assert names(with_t5) == sd3_dit_keys() | clip_keys("lora_te1") | clip_keys("lora_te2") | t5_keys()
    assert with_t5.train_t5xxl is True


def test_lumina_anima_hunyuan_keys():
    gemma = {f"lora_te_layers_{i}_{leaf}" for i in range(2) for leaf in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj",
        "mlp_gate_proj", "mlp_up_proj", "mlp_down_proj")}
    block = ("attention_qkv", "attention_out", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3")
    lumina = ({f"lora_unet_context_refiner_0_{leaf}" for leaf in block}
              | {f"lora_unet_{where}_{leaf}" for where in ("noise_refiner_0", "layers_0", "layers_1")
                 for leaf in block + ("adaLN_modulation_1",)}
              | {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"})
    assert names(make(([dit_like.gemma2()], dit_like.NextDiT()))) == lumina | gemma

    qwen = gemma  # Qwen3Model has the same paths as Gemma2Model
    # lora_anima's default: Block, minus its default exclude .*(_modulation|_norm|_embedder|final_layer).*
    anima = {f"lora_unet_blocks_{i}_{att}_{p}" for i in range(2) for att in ("self_attn", "cross_attn")
             for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
    anima |= {f"lora_unet_blocks_{i}_mlp_layer{j}" for i in range(2) for j in (1, 2)}
    assert names(make(([dit_like.qwen3()], dit_like.Anima()))) == anima | qwen

    double = ("img_mod_linear", "img_attn_qkv", "img_attn_proj", "img_mlp_fc1", "img_mlp_fc2",
              "txt_mod_linear", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_fc1", "txt_mlp_fc2")
    hunyuan = ({f"lora_unet_double_blocks_{i}_{leaf}" for i in range(2) for leaf in double}
               | {f"lora_unet_single_blocks_{i}_{leaf}" for i in range(2) for leaf in ("linear1", "linear2", "modulation_linear")})
    # its text encoders are handed over but never adapted (lora_hunyuan_image.py)
    net = make(([clip_l(), t5xxl()], dit_like.HYImageDiffusionTransformer()))
    assert names(net) == hunyuan and not net.text_encoder_loras


# module counts (DiT, text encoders without T5, T5) per preset, read off the miniatures' docstrings
COUNTS = {
    "flux": {"default": (26, 12, 14), "full": (36, 12, 14), "full-lin": (36, 12, 14), "attn-mlp": (20, 12, 14),
             "attn-only": (8, 8, 8), "unet-only": (26, 0, 0)},
    "sd3": {"default": (29, 24, 14), "full": (37, 24, 14), "full-lin": (36, 24, 14), "attn-mlp": (23, 24, 14),
            "attn-only": (13, 16, 8), "unet-only": (29, 0, 0)},
    "lumina": {"default": (25, 14, 0), "full": (29, 14, 0), "full-lin": (29, 14, 0), "attn-mlp": (20, 14, 0),
               "attn-only": (8, 8, 0), "unet-only": (25, 0, 0)},
    "anima": {"default": (20, 14, 0), "full": (48, 14, 0), "full-lin": (48, 14, 0), "attn-mlp": (20, 14, 0),
              "attn-only": (16, 8, 0), "unet-only": (20, 0, 0)},
    "hunyuan_image": {"default": (26, 0, 0), "full": (35, 0, 0), "full-lin": (34, 0, 0), "attn-mlp": (20, 0, 0),
                      "attn-only": (8, 0, 0), "unet-only": (26, 0, 0)},
}
MODELS = {
    "flux": flux_models, "sd3": sd3_models,
    "lumina": lambda: ([dit_like.gemma2()], dit_like.NextDiT()),
    "anima": lambda: ([dit_like.qwen3()], dit_like.Anima()),
    "hunyuan_image": lambda: ([clip_l(), t5xxl()], dit_like.HYImageDiffusionTransformer()),
}


@pytest.mark.parametrize("family,preset", [(f, p) for f in COUNTS for p in COUNTS[f]])
def test_module_counts_per_preset(family, preset):
    dit, te, t5 = COUNTS[family][preset]
    net = make(MODELS[family](), preset=preset, conv_dim="2")
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (dit, te)
    if family in ("flux", "sd3"):
        net = make(MODELS[family](), preset=preset, conv_dim="2", train_t5xxl="True")
        assert (len(net.unet_loras), len(net.text_encoder_loras)) == (dit, te + t5)
        assert net.train_t5xxl is (t5 > 0)


def test_presets_name_the_layers_they_say():
    by = {p: names(make(flux_models(), preset=p, train_t5xxl="True")) for p in ("attn-mlp", "attn-only", "full")}
    assert not any("mod_lin" in n or "modulation" in n for n in by["attn-mlp"])
    assert {n for n in by["attn-only"] if n.startswith("lora_unet")} == {
        f"lora_unet_double_blocks_{i}_{s}_attn_{p}" for i in range(2) for s in ("img", "txt") for p in ("qkv", "proj")}
    assert all("SelfAttention" in n or "self_attn" in n for n in by["attn-only"] if n.startswith("lora_te"))
    assert {"lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_vector_in_out_layer",
            "lora_unet_guidance_in_in_layer", "lora_unet_final_layer_linear",
            "lora_unet_final_layer_adaLN_modulation_1"} <= by["full"]
    sd3_full = names(make(sd3_models(), preset="full", conv_dim="2"))
    assert {"lora_unet_x_embedder_proj", "lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0",
            "lora_unet_y_embedder_mlp_2", "lora_unet_final_layer_linear"} <= sd3_full


def test_sd_only_presets_are_refused_on_a_dit_by_name():
    with pytest.raises(ConfigError, match=r"preset='ia3' is not defined for this model family \(flux\).*attn-only"):
        make(flux_models(), preset="ia3")


def test_a_missing_text_encoder_keeps_its_place():
    """sd-scripts numbers text encoders by position: T5 stays lora_te3 when CLIP-L is None (Chroma-style)."""
    net = lycoris_kohya.create_network(1.0, 4, 1, None, [None, t5xxl()], Flux(), train_t5xxl="True")
    assert {n.split("_encoder_")[0] for n in names(net) if n.startswith("lora_te")} == {"lora_te3"}


def test_train_t5xxl_on_a_model_without_t5_is_an_error():
    with pytest.raises(ConfigError, match="train_t5xxl=True: Lumina models have no T5-XXL"):
        make(([dit_like.gemma2()], dit_like.NextDiT()), train_t5xxl="True")
    assert make(flux_models(), train_t5xxl="false").train_t5xxl is False


@pytest.mark.parametrize("key,value", [("block_dims", "4,4,4"), ("down_lr_weight", "sine"), ("mid_lr_weight", "1"),
                                       ("conv_block_dims", "2,2")])
def test_unet_block_options_are_refused_on_a_dit(key, value):
    with pytest.raises(ConfigError, match=f"network_arg {key} applies to the down/mid/up blocks.*Flux is a DiT"):
        make(flux_models(), **{key: value})


# ----- files, merges, norms ------------------------------------------------------------------------
ALGOS = {
    "locon": {"algo": "locon"}, "loha": {"algo": "loha"}, "lokr": {"algo": "lokr", "factor": "4"},
    "lokr_full": {"algo": "lokr", "full_matrix": "true"}, "locon_dora": {"algo": "locon", "dora_wd": "true"},
    "loha_dora_out": {"algo": "loha", "dora_wd": "true", "wd_on_output": "true"},
    "lokr_dora": {"algo": "lokr", "dora_wd": "true"},
    "loha_scalar": {"algo": "loha", "use_scalar": "true"}, "lokr_unbalanced": {"algo": "lokr", "unbalanced_factorization": "true"},
    "locon_rs": {"algo": "locon", "rs_lora": "true"},
}


def trained(models, variant, seed=0, **extra):
    net = make(models, train_t5xxl="True", **ALGOS[variant], **extra)
    randomize(net, seed=seed, std=0.05)
    with torch.no_grad():
        for a in net.loras:
            if a.dora_axis is not None:  # magnitudes near ||W0||, as after some training
                w0 = a.layer.weight
                norm = column_norm(w0) if a.dora_axis == "input" else row_norm(w0)
                a.dora_scale.copy_(norm * (1 + 0.1 * torch.rand(a.dora_scale.shape)))
    return net


def by_key(tes, dit, te_prefixes):
    """key -> layer of fresh models, by sd-scripts' rule (CLIP paths spelled as transformers 4 does)."""
    out = {}
    for prefix, model in list(zip(te_prefixes, tes)) + [("lora_unet", dit)]:
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if type(model).__name__.startswith("CLIP") and not path.startswith("text_model."):
                    path = "text_model." + path  # transformers 5
                out[prefix + "_" + path.replace(".", "_")] = m
    return out


def expected_weight(sd, name, w0, m):
    g, dw = reference_delta(sd, name, w0.shape)
    if name + ".dora_scale" not in sd:
        return w0 + m * g * dw
    axis = "input" if sd[name + ".dora_scale"].shape[0] == 1 else "output"
    return trained_weight(w0, g, dw, sd[name + ".dora_scale"], m, axis)


FAMILY_TES = {"flux": ("lora_te1", "lora_te3"), "sd3": ("lora_te1", "lora_te2", "lora_te3")}
CASES = [("flux", v, {}) for v in ALGOS] + [("sd3", v, {"preset": "full", "conv_dim": "2"})
                                           for v in ("locon", "loha_dora_out", "lokr_dora")]


@pytest.mark.parametrize("family,variant,extra", CASES, ids=[f"{f}-{v}" for f, v, _ in CASES])
def test_save_reload_resume_and_merge(family, variant, extra, tmp_path):
    """On Flux every algorithm and DoRA axis; on SD3 also its 2x2-conv patch embedder (preset full)."""
    net = trained(MODELS[family](), variant, **extra)
    path = str(tmp_path / "f.safetensors")
    net.save_weights(path, torch.float32, {"ss_base_model_version": family})
    sd = load_file(path)
    assert {k.split(".")[0] for k in sd} == names(net)

    # create_network_from_weights: same layouts, same deltas, T5 found in the file
    tes, dit = MODELS[family]()
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, path, None, tes, dit)
    assert loaded.train_t5xxl is True and names(loaded) == names(net)
    for a, b in zip(net.loras, loaded.loras):
        assert a.lora_name == b.lora_name and a.dora_axis == b.dora_axis
        assert torch.allclose(a.delta(), b.delta(), atol=1e-6)

    # resume: a fresh network of the same options takes the file (load_weights)
    resumed = make(MODELS[family](), train_t5xxl="True", **ALGOS[variant], **extra)
    resumed.load_weights(path)
    for a, b in zip(resumed.loras, loaded.loras):  # (use_scalar: the file holds it folded in; it resumes at 1)
        assert a.lora_name == b.lora_name and torch.allclose(a.delta(), b.delta(), atol=1e-6)

    # merge_to at 0.5 on fresh models: W0 + 0.5*g*dW, or the DoRA formula, for every kind of layer
    tes, dit = MODELS[family]()
    layers = by_key(tes, dit, FAMILY_TES[family])
    before = {k: layer.weight.detach().clone() for k, layer in layers.items()}
    merger, weights_sd = lycoris_kohya.create_network_from_weights(0.5, path, None, tes, dit, for_inference=True)
    merger.merge_to(tes, dit, weights_sd, torch.float32, "cpu")
    for name in names(net):
        want = expected_weight(sd, name, before[name], 0.5)
        assert torch.allclose(layers[name].weight, want, atol=1e-5), (variant, name)
    untouched = set(layers) - names(net)
    assert untouched and all(torch.equal(layers[k].weight, before[k]) for k in untouched)
    if family == "sd3":
        assert "lora_unet_x_embedder_proj" in names(net) and {"lora_te2", "lora_te3"} <= {n[:8] for n in names(net)}


@pytest.mark.parametrize("variant", ["locon", "loha_dora_out", "lokr_dora"])
def test_forward_of_fused_layers_equals_the_merged_weight(variant):
    tes, dit = flux_models()
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, tes, dit, **ALGOS[variant])
    randomize(net, seed=1, std=0.05)
    net.apply_to(tes, dit)
    net.set_multiplier(0.7)
    net.eval()
    sd = net.export_state_dict()
    g = torch.Generator().manual_seed(0)
    for name, layer in (("lora_unet_double_blocks_1_txt_attn_qkv", dit.double_blocks[1].txt_attn.qkv),
                        ("lora_unet_single_blocks_0_linear1", dit.single_blocks[0].linear1),
                        ("lora_unet_single_blocks_1_modulation_lin", dit.single_blocks[1].modulation.lin)):
        x = torch.randn(2, 5, layer.in_features, generator=g)
        with torch.no_grad():
            want = nn.functional.linear(x, expected_weight(sd, name, layer.weight, 0.7), layer.bias)
            assert torch.allclose(layer(x), want, atol=1e-5), name


def delta_norms(net):
    """||g*dW||_F of every module, from its exported tensors and the closed forms."""
    sd = net.export_state_dict()
    out = {}
    for a in net.loras:
        g, dw = reference_delta(sd, a.lora_name, a.layer.weight.shape)
        out[a.lora_name] = float((g * dw).norm())
    return out


def test_max_norm_on_flux_bounds_every_module():
    net = trained(flux_models(), "loha")
    norms = delta_norms(net)
    ordered = sorted(norms.values())
    limit = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two modules' norms
    scaled, mean, mx = net.apply_max_norm_regularization(limit, "cpu")
    assert type(scaled) is int and type(mean) is float and type(mx) is float
    assert scaled == sum(v > limit for v in norms.values())
    after = list(delta_norms(net).values())
    assert max(after) == pytest.approx(limit, rel=1e-4) and mx == pytest.approx(limit, rel=1e-4)
    assert mean == pytest.approx(sum(after) / len(after), rel=1e-4)


def test_text_encoder_learning_rates_follow_sd_scripts_order():
    """Flux: CLIP-L gets text_encoder_lr[0], T5-XXL [1]; SD3 with two entries: T5-XXL gets the last."""
    net = make(flux_models(), train_t5xxl="True")
    groups, desc = net.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-5], 1e-3, 1e-3)
    assert desc == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 2e-5, 1e-3]
    assert len(groups[1]["params"]) == 14 * 2  # T5: 14 modules x (lora_down, lora_up); alpha is a buffer
    sd3 = make(sd3_models(), train_t5xxl="True")
    groups, desc = sd3.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 3e-5], 1e-3, 1e-3)
    assert [g["lr"] for g in groups] == [1e-4, 3e-5, 3e-5, 1e-3]
