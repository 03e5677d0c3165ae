"""Shared fixtures: tiny random SD1.x and SDXL checkpoints built locally (scripts/make_tiny_sd.py)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Every tensor here is tiny: one intra-op thread is as fast on an idle machine, and on a shared
    one (2 cores, other jobs) OpenMP's spinning threads made the suite ~2.5x slower (single
    calls 40x).
    LYCORIS_TEST_THREADS=N runs with N threads (0: torch's default)."""
    n = torch.get_num_threads()
    want = int(os.environ.get("LYCORIS_TEST_THREADS", "1"))
    if want:
        torch.set_num_threads(want)
    yield
    torch.set_num_threads(n)


def built_once(tmp_path_factory, name, build):
    """build(folder) run once per test run, its folder shared by pytest-xdist's workers (under a
    lock beside pytest's temporary root; the builders skip a folder that is already complete)."""
    from filelock import FileLock  # torch's own dependency

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' roots are siblings
    folder = str(root / name)
    with FileLock(folder + ".lock"):
        return build(folder)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from make_tiny_sd import build_tiny_sd

    return built_once(tmp_path_factory, "tiny-sd", build_tiny_sd)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from make_tiny_sd import build_tiny_sdxl

    return built_once(tmp_path_factory, "tiny-sdxl", build_tiny_sdxl)


@pytest.fixture
def sdxl_models(tiny_sdxl):
    """Fresh ([te1, te2], U-Net under sd-scripts' SDXL module paths, diffusers U-Net), frozen, eval mode."""
    from smoke_train import Models

    m = Models(tiny_sdxl, sdxl=True)
    return m.text_encoder, m.unet, m.diffusers_unet


@pytest.fixture
def models(tiny_sd):
    """Fresh (text_encoder, unet) from the tiny checkpoint, frozen, eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval().requires_grad_(False)
    return te, unet


def randomize(network, seed=0, std=0.1):
    """Give every trainable tensor random values (lora_up starts at zero, so deltas would vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return network
