"""What a user reads: errors that name what they wrote, warnings for options that do nothing on the
model given (once), and the one training-log line that says what was built. Expected texts are the
user's own spellings (flags, keys) and counts taken from the models built here."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lycoris_kohya
from lycoris_kohya.config import ConfigError

from flux_like import Flux
from test_algorithms import ToyUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def errors_of(dim, alpha, **kw):
    with pytest.raises(ConfigError) as e:
        lycoris_kohya.create_network(1.0, dim, alpha, None, None, ToyUNet(), **kw)
    return str(e.value)


@pytest.mark.parametrize("dim,alpha,flag", [(0, 1, "--network_dim 0"), (4, -1, "--network_alpha -1")])
def test_bad_dim_or_alpha_names_the_trainer_flag(dim, alpha, flag):
    msg = errors_of(dim, alpha)
    assert msg.startswith(flag) and "network_arg" not in msg


@pytest.mark.parametrize("typo,meant", [("factr", "factor"), ("dora_wb", "dora_wd"), ("rank_droput", "rank_dropout")])
def test_a_typo_suggests_the_close_key(typo, meant):
    msg = errors_of(4, 1, **{typo: "8"})
    assert f"unknown network_arg {typo!r} (did you mean {meant!r}?)" in msg


def test_an_unrelated_key_gets_no_suggestion():
    assert "did you mean" not in errors_of(4, 1, zzzz="1")


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_conv_dim_on_a_dit_warns_once(caplog):
    flux = Flux()
    with caplog.at_level(logging.INFO, logger="lycoris_kohya"):
        net = lycoris_kohya.create_network(1.0, 4, 1, None, None, flux, conv_dim="4", conv_alpha="1")
    conv = [w for w in warnings(caplog) if "conv_dim=4 has no effect" in w]
    assert len(conv) == 1 and "no kxk convolution" in conv[0]
    assert len([w for w in warnings(caplog) if "conv_alpha=1 has no effect" in w]) == 1
    # and the training log names the DiT, never a U-Net
    infos = [r.getMessage() for r in caplog.records]
    summary = [m for m in infos if "network," in m]
    assert summary and f"{len(net.unet_loras)} Flux DiT modules" in summary[-1] and "U-Net" not in summary[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lycoris_kohya"):
        net.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    assert any("Flux DiT layers" in r.getMessage() for r in caplog.records)
    assert not any("U-Net" in r.getMessage() for r in caplog.records)


def test_conv_dim_where_there_are_convs_says_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="lycoris_kohya"):
        lycoris_kohya.create_network(1.0, 4, 1, None, None, ToyUNet(), conv_dim="4", preset="full")
    assert not [w for w in warnings(caplog) if "has no effect" in w]


def test_lokr_with_default_settings_warns_nothing(caplog):
    """LyCORIS' rule makes lokr_w2 full where the rank is at least half of its side; that is the
    layout working as documented, a note in the log, not a warning on every LoKr run."""
    with caplog.at_level(logging.INFO, logger="lycoris_kohya"):
        net = lycoris_kohya.create_network(1.0, 8, 4, None, None, ToyUNet(), algo="lokr")
    assert warnings(caplog) == []
    full = sum(1 for a in net.loras if not a.layout.w2_lowrank)
    notes = [r.getMessage() for r in caplog.records if "lokr_w2 as a full matrix" in r.getMessage()]
    assert full > 0 and len(notes) == 1 and f"{full} of {len(net.loras)} modules" in notes[0]


def test_decompose_both_without_effect_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lycoris_kohya"):
        net = lycoris_kohya.create_network(1.0, 64, 4, None, None, ToyUNet(), algo="lokr", decompose_both="true")
    assert not any(a.layout.w1_lowrank for a in net.loras)
    assert len([w for w in warnings(caplog) if "decompose_both has no effect" in w]) == 1


def test_training_log_line_says_what_was_built(caplog):
    from tiny_models import clip

    te = clip(1)
    with caplog.at_level(logging.INFO, logger="lycoris_kohya"):
        net = lycoris_kohya.create_network(1.0, 6, 3, None, te, ToyUNet(), algo="loha", dora_wd="true",
                                           conv_dim="2", conv_alpha="1", preset="full")
    line = [r.getMessage() for r in caplog.records if "network," in r.getMessage()][-1]
    n_te, n_unet = len(net.text_encoder_loras), len(net.unet_loras)
    assert n_te > 0 and n_unet > 0
    for part in ("loha network", "rank 6 alpha 3", "kxk convolutions rank 2 alpha 1", "DoRA on the input axis",
                 "preset full", f"{n_te} text encoder modules (lora_te {n_te})", f"{n_unet} U-Net modules"):
        assert part in line, (part, line)


def test_an_explicit_algo_that_the_file_overrides_is_said(caplog, tmp_path):
    unet = ToyUNet()
    net = lycoris_kohya.create_network(1.0, 4, 1, None, None, unet, algo="loha")
    path = str(tmp_path / "loha.safetensors")
    net.save_weights(path, torch.float32, {})
    with caplog.at_level(logging.WARNING, logger="lycoris_kohya"):
        loaded, _ = lycoris_kohya.create_network_from_weights(1.0, path, None, None, ToyUNet(), algo="lokr")
    assert {a.algo for a in loaded.loras} == {"loha"}
    said = [w for w in warnings(caplog) if "algo=lokr is not used" in w]
    assert len(said) == 1 and path in said[0] and "loha" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lycoris_kohya"):
        lycoris_kohya.create_network_from_weights(1.0, path, None, None, ToyUNet(), algo="loha")
    assert not warnings(caplog)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["unet-only", "style-no-cross-attn"])
def test_smoke_train_checks_what_the_preset_adapts(preset, tmp_path):
    """Presets without text encoder layers: the smoke train checks the encoder is unchanged instead of
    expecting it to move, and passes."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "smoke_train.py"), "--output_dir", str(tmp_path),
                        "--max_train_steps", "2", "--network_args", f"preset={preset}"],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "smoke train passed" in out, out[-3000:]
    assert "text encoder not trained (the preset adapts no text encoder layer)" in out


def test_a_configuration_error_is_logged_as_one_line(caplog):
    with caplog.at_level(logging.ERROR, logger="lycoris_kohya"):
        msg = errors_of(0, 1)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [f"lycoris_kohya: configuration error: {msg}"] and "\n" not in lines[0]
