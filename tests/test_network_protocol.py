"""The kohya protocol on a real (tiny) diffusers UNet and CLIP text encoder."""
import hashlib
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import lycoris_kohya
from lycoris_kohya import kohya as kohya_entry

from conftest import randomize


def net_for(models, *args, **kw):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, te, unet, *args, **kw)
    randomize(net, seed=2, std=0.05)
    return net


def closed_form_merged(sd, name, w0, m):
    down, up = sd[name + ".lora_down.weight"].float(), sd[name + ".lora_up.weight"].float()
    r = down.shape[0]
    dw = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(w0.shape)
    return w0 + m * float(sd[name + ".alpha"]) / r * dw


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 77, 32, generator=g)


def test_entry_points_are_importable_both_ways():
    assert kohya_entry.create_network is lycoris_kohya.create_network
    assert kohya_entry.create_network_from_weights is lycoris_kohya.create_network_from_weights


def test_canonical_names_and_counts(models):
    """79 U-Net layers with conv_dim (61 without 3x3 convs), 12 text encoder layers (2 CLIP layers x 6),
    keys as transformers 4 spells them whatever the installed version."""
    te, unet = models
    net = net_for(models, conv_dim="4")
    names = {a.lora_name for a in net.loras}
    assert len(net.text_encoder_loras) == 12 and len(net.unet_loras) == 79
    for i in range(2):
        for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"):
            assert f"lora_te_text_model_encoder_layers_{i}_{leaf}" in names
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
                "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"):
        assert key in names, key
    assert not any("conv_in" in n or "conv_out" in n or "time_embedding" in n for n in names)
    no_conv = lycoris_kohya.create_network(1.0, 4, 1, None, te, unet, conv_dim="0")
    assert len(no_conv.unet_loras) == 61
    assert set(net.state_dict()) == {f"{n}.{s}" for n in names for s in ("alpha", "lora_down.weight", "lora_up.weight")}


def test_sdxl_style_text_encoders_get_te1_te2_prefixes(models):
    te, unet = models
    from transformers import CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection(te.config)
    net = lycoris_kohya.create_network(1.0, 4, 1, None, [te, te2], unet)
    prefixes = {a.lora_name.split("_text_model_")[0] for a in net.text_encoder_loras}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in {a.lora_name for a in net.loras}


def test_multiplier_enable_and_train_unet_only(models):
    te, unet = models
    net = net_for(models)
    x, t, enc = unet_inputs()
    with torch.no_grad():
        base = unet(x, t, enc).sample
    net.apply_to(te, unet, apply_text_encoder=False)
    assert net.text_encoder_loras == [] and all(k.startswith("lora_unet") for k in net.state_dict())
    with torch.no_grad():
        on = unet(x, t, enc).sample
        net.set_multiplier(0.0)
        zero = unet(x, t, enc).sample
        net.set_multiplier(1.0)
        net.set_enabled(False)
        off = unet(x, t, enc).sample
    assert not torch.allclose(on, base)
    assert torch.equal(zero, base) and torch.equal(off, base)


def test_optimizer_params_lrs_and_loraplus(models):
    net = net_for(models, loraplus_lr_ratio="16")
    groups, desc = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-5, 5e-5 * 16, 1e-4, 1e-4 * 16])
    plus_ids = {id(p) for g in (groups[1], groups[3]) for p in g["params"]}
    assert plus_ids == {id(a.lora_up.weight) for a in net.loras}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    plain = net_for(models)
    groups, desc = plain.prepare_optimizer_params(None, None, 2e-4)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [2e-4, 2e-4]
    groups, desc = plain.prepare_optimizer_params(0.0, 1e-4, 2e-4)  # lr 0: left out
    assert desc == ["unet"]
    groups, desc = plain.prepare_optimizer_params_with_multiple_te_lrs([3e-5], 1e-4, 2e-4)
    assert [g["lr"] for g in groups] == [3e-5, 1e-4]


def sd_scripts_hashes(tensors, metadata):
    """sd-scripts' library/train_util.precalculate_safetensors_hashes, restated here (SPEC section 4):
    serialise with only the ss_* metadata (a dict, possibly empty), then sha256 of the data part
    (after the 8-byte length and the header) and the first 8 hex of sha256 of 64 KiB at 1 MiB."""
    blob = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("ss", [{"ss_network_module": "lycoris_kohya", "ss_network_dim": "32"}, {}])
def test_save_writes_metadata_and_a1111_hashes(models, tmp_path, ss):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 32, 2.0, None, te, unet)  # rank 32: a 2.3 MiB file
    randomize(net, seed=2, std=0.05)
    path = str(tmp_path / "net.safetensors")
    meta = {**ss, "user_note": "x", "lora_adapter_metadata": "{}"}
    net.save_weights(path, torch.float32, meta)
    blob = open(path, "rb").read()
    assert len(blob) > 0x110000  # the legacy hash reads 64 KiB at 1 MiB: the file must reach past it
    with safe_open(path, "pt") as f:
        got = f.metadata()
    assert "lora_adapter_metadata" not in got and got["user_note"] == "x"
    header_len = int.from_bytes(blob[:8], "little")
    assert got["sshs_model_hash"] == hashlib.sha256(blob[8 + header_len:]).hexdigest()
    model_hash, legacy_hash = sd_scripts_hashes(load_file(path), meta)
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == (model_hash, legacy_hash)
    # the legacy hash depends on the ss_* header: different ss metadata, different hash
    other = sd_scripts_hashes(load_file(path), {**ss, "ss_network_alpha": "2.0"})[1]
    assert other != legacy_hash


def test_fp16_save_keeps_the_dtype(models, tmp_path):
    net = net_for(models)
    path = str(tmp_path / "net.safetensors")
    net.save_weights(path, torch.float16, {})
    with safe_open(path, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def big_net(models):
    te, unet = models
    return randomize(lycoris_kohya.create_network(1.0, 32, 2.0, None, te, unet), seed=3)


def test_save_interrupted_in_the_write_leaves_the_old_file(models, tmp_path):
    """A real short write: the file-size limit (RLIMIT_FSIZE) stops the kernel's write at 1 MiB of
    the 2.3 MiB file, as a full disk would."""
    resource = pytest.importorskip("resource")
    import errno
    import signal

    net = big_net(models)
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"previous file")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of killing the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(OSError) as e:
            net.save_weights(str(path), torch.float32, {"ss_x": "1"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert e.value.errno == errno.EFBIG
    assert path.read_bytes() == b"previous file"
    assert os.listdir(tmp_path) == ["net.safetensors"]


@pytest.mark.parametrize("error", [OSError("rename failed"), KeyboardInterrupt()])
def test_save_interrupted_at_the_rename_leaves_the_old_file(models, tmp_path, monkeypatch, error):
    net = big_net(models)
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"previous file")
    written = []

    def interrupted_replace(src, dst):
        written.append(os.path.getsize(src))  # the temporary file is complete when the rename fails
        raise error

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(type(error)):
        net.save_weights(str(path), torch.float32, {})
    assert written and written[0] > 0x200000
    assert path.read_bytes() == b"previous file"
    assert os.listdir(tmp_path) == ["net.safetensors"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_saved_file_mode_honours_the_umask(models, tmp_path, umask, mode):
    net = net_for(models)
    old = os.umask(umask)
    try:
        for name in ("a.safetensors", "a.pt"):
            net.save_weights(str(tmp_path / name), None, {})
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    finally:
        os.umask(old)


def test_overwriting_keeps_the_old_files_mode(models, tmp_path):
    net = net_for(models)
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"previous file")
    os.chmod(path, 0o604)
    net.save_weights(str(path), None, {})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
    assert load_file(str(path)).keys() == net.state_dict().keys()


def test_reload_reproduces_outputs_and_honours_multiplier_and_kwargs(models, tiny_sd, tmp_path):
    te, unet = models
    net = net_for(models, conv_dim="4", conv_alpha="1", use_tucker="true")
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, torch.float32, {})
    net.apply_to(te, unet)
    x, t, enc = unet_inputs()
    with torch.no_grad():
        ref = unet(x, t, enc).sample
        net.set_multiplier(0.5)
        ref_half = unet(x, t, enc).sample

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet2 = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    te2 = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    loaded, sd = lycoris_kohya.create_network_from_weights(0.5, path, None, te2, unet2, rank_dropout="0.25")
    assert {a.lora_name for a in loaded.loras} == {a.lora_name for a in net.loras}
    assert all(a.rank_dropout == 0.25 for a in loaded.loras)
    assert sum(a.lora_mid is not None for a in loaded.loras) == 18  # Tucker inferred from shapes
    loaded.apply_to(te2, unet2)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(unet2(x, t, enc).sample, ref_half)
        loaded.set_multiplier(1.0)
        assert torch.equal(unet2(x, t, enc).sample, ref)


def test_merge_to_honours_multiplier_and_dtype(models, tiny_sd, tmp_path):
    te, unet = models
    net = net_for(models, conv_dim="4")
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, torch.float32, {})
    sd = load_file(path)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w0 = unet.down_blocks[0].resnets[0].conv1.weight.detach().clone()
    q0 = te.text_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone() if hasattr(te, "text_model") \
        else te.encoder.layers[0].self_attn.q_proj.weight.detach().clone()

    merger, weights_sd = lycoris_kohya.create_network_from_weights(0.5, path, None, te, unet, for_inference=True)
    merger.merge_to(te, unet, weights_sd, torch.bfloat16, "cpu")
    got = unet.down_blocks[0].resnets[0].conv1.weight
    want = closed_form_merged(sd, name, w0, 0.5).to(torch.bfloat16).float()
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    te_layer = te.text_model.encoder.layers[0] if hasattr(te, "text_model") else te.encoder.layers[0]
    want_q = closed_form_merged(sd, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", q0, 0.5)
    assert torch.allclose(te_layer.self_attn.q_proj.weight, want_q.to(torch.bfloat16).float())


def test_gen_img_hooks(models):
    te, unet = models
    net = net_for(models, conv_dim="4")
    net.apply_to(te, unet)
    net.eval()
    x, t, enc = unet_inputs()
    w0 = unet.conv_in.weight.clone(), unet.down_blocks[0].resnets[0].conv1.weight.clone()
    with torch.no_grad():
        hooked = unet(x, t, enc).sample
        net.backup_weights()
        net.pre_calculation()
        assert not torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, w0[1])
        pre = unet(x, t, enc).sample
        net.restore_weights()
        assert torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, w0[1])
        again = unet(x, t, enc).sample
    assert torch.allclose(pre, hooked, atol=1e-5)
    assert torch.equal(again, hooked)


def test_file_that_does_not_fit_names_the_module(models, tmp_path):
    te, unet = models
    net = net_for(models)
    sd = {k: v for k, v in net.state_dict().items()}
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="lora_unet_no_such_layer"):
        lycoris_kohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=sd)
    bad = {k: v for k, v in net.state_dict().items()}
    bad["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 31, 1, 1)
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_attentions_0_proj_in"):
        lycoris_kohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=bad)
    odd = {k: v for k, v in net.state_dict().items()}
    odd["lora_unet_conv_in.hada_w9"] = torch.zeros(1)
    with pytest.raises(ValueError, match="lora_unet_conv_in"):
        lycoris_kohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=odd)


def test_network_moves_with_to(models):
    net = net_for(models)
    net.to(torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}


def test_alpha_is_rounded_once_to_what_files_store(models, tmp_path):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 0.3, None, te, unet)
    a = net.loras[0]
    stored = 0.30078125  # SPEC section 3: bf16 stores 0.3 as 0.30078125
    assert a.scale == stored / 4
    path = str(tmp_path / "n.safetensors")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        net.save_weights(path, dtype, {})
        assert float(load_file(path)[a.lora_name + ".alpha"]) == stored, dtype


# ----- the optional protocol: norms logged without --scale_weight_norms, regional prompting -------
@pytest.mark.parametrize("args", [{"algo": "locon", "use_tucker": "true"}, {"algo": "loha"},
                                  {"algo": "lokr", "dora_wd": "true", "use_scalar": "true"}])
def test_norm_logging_as_train_network_calls_it(args):
    from test_algorithms import INPUTS, ToyUNet, reference_delta

    unet = ToyUNet()
    net = randomize(lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, **args), seed=4, std=0.2)
    net.apply_to([], unet)
    params, _ = net.prepare_optimizer_params(None, 1e-2, 1e-2)
    opt = torch.optim.SGD(params, lr=1e-2)
    net.train()
    loss = sum(getattr(unet.block, n)(make()).square().mean() for n, make in INPUTS.items())
    loss.backward()
    # independent: per module, the 2-norm over all its gradients; ||g*dW|| from the exported tensors
    want_grads = [float(torch.cat([p.grad.flatten() for p in a.parameters()]).norm()) for a in net.loras]
    sd = net.export_state_dict()
    want_weights = []
    for a in net.loras:
        g, dw = reference_delta(sd, a.lora_name, a.layer.weight.shape)
        want_weights.append(float((g * dw).norm()))
    # train_network.py: if accelerator.sync_gradients: update_grad_norms(); update_norms()
    net.update_grad_norms()
    net.update_norms()
    opt.step()
    opt.zero_grad(set_to_none=True)
    weight_norms, grad_norms = net.weight_norms(), net.grad_norms()
    assert net.combined_weight_norms() is None
    assert weight_norms.tolist() == pytest.approx(want_weights, rel=1e-4)
    assert grad_norms.tolist() == pytest.approx(want_grads, rel=1e-5)
    # what train_network logs
    assert weight_norms.mean().item() == pytest.approx(sum(want_weights) / len(want_weights), rel=1e-4)
    assert weight_norms.max().item() == pytest.approx(max(want_weights), rel=1e-4)
    assert grad_norms.mean().item() > 0


def test_norm_logging_stops_on_a_non_finite_tensor():
    from test_algorithms import ToyUNet

    net = randomize(lycoris_kohya.create_network(1.0, 2, 3.0, None, [], ToyUNet(), algo="loha"))
    with torch.no_grad():
        net.loras[1].hada_w2_b.view(-1)[3] = float("nan")
    with pytest.raises(FloatingPointError, match=net.loras[1].lora_name + r"\.hada_w2_b"):
        net.update_norms()


def test_regional_prompting_is_a_clear_error(models):
    net = net_for(models)
    for call in (lambda: net.set_region(0, True, torch.ones(8, 8)),
                 lambda: net.set_current_generation(1, 2, 64, 64, {}, None)):
        with pytest.raises(NotImplementedError, match="--network_regional_mask_max_color_codes"):
            call()
