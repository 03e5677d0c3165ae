"""The accelerator set (``-m cuda``): what only a GPU run shows, runnable on the CPU too so that the
device check (scripts/gpu_check.sh) is debugged before a GPU is lent. The device is
LYCORIS_TEST_DEVICE (default: cuda where there is one, else cpu; asked for cuda without one, it skips).

Each test compares the device run with the same network evaluated in fp32 on the CPU: what is under
test is device and dtype handling (moves after creation, autocast, bf16 training, fp8 bases,
torch.compile); the math itself is tested against closed forms elsewhere. Without CUDA (and without
LYCORIS_TEST_DEVICE) the set runs on the CPU, so the fast core covers the CPU side of each case."""
import os

import pytest
import torch
from torch import nn

from lycoris_kohya.algos import ALGORITHMS, Adapter

DEVICE = os.environ.get("LYCORIS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [("locon", None), ("loha", None), ("lokr", None), ("locon", "input"), ("loha", "input"), ("lokr", "output")]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(48, 40)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def adapted(algo, axis, seed=0, path="auto"):
    torch.manual_seed(seed)
    block = Block().requires_grad_(False)
    adapters = [Adapter(n, getattr(block, n), ALGORITHMS[algo], rank=4, alpha=2.0, dora_axis=axis, forward_path=path)
                for n in ("lin", "conv")]
    for a in adapters:
        with torch.no_grad():
            for p in a.parameters():
                if p.dim() > 0 and p is not getattr(a, "dora_scale", None):
                    p.normal_(0, 0.2)
                elif p is getattr(a, "dora_scale", None):
                    p.mul_(1.3)
        a.apply_to()
    return block, nn.ModuleList(adapters)


def inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(6, 48, generator=g).to(device, dtype), torch.randn(2, 8, 5, 5, generator=g).to(device, dtype))


def reference(algo, axis):
    block, net = adapted(algo, axis)
    return [o.detach() for o in block(*inputs("cpu"))]


def close(got, want, tol):
    for g, w in zip(got, want):
        err = float((g.detach().float().cpu() - w).abs().max() / w.abs().max())
        assert err < tol, err


@pytest.mark.parametrize("algo,axis", CASES)
def test_moved_after_creation(algo, axis):
    """.to(device) after the network was built: the magnitude, alpha and every factor move; the
    DoRA ||W0|| cache follows the weight to its new device."""
    want = reference(algo, axis)
    block, net = adapted(algo, axis)
    block(*inputs("cpu"))  # fills CPU-side caches first
    block.to(DEVICE)
    net.to(DEVICE)
    assert all(p.device.type == torch.device(DEVICE).type for p in net.parameters())
    close(block(*inputs(DEVICE)), want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algo,axis", CASES)
def test_autocast(algo, axis, dtype):
    want = reference(algo, axis)
    block, net = adapted(algo, axis)
    block.to(DEVICE)
    net.to(DEVICE)
    x = [t.requires_grad_(True) for t in inputs(DEVICE)]
    with torch.autocast(torch.device(DEVICE).type, dtype):
        out = block(*x)
    close(out, want, 3e-2)
    sum(o.float().square().sum() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("algo,axis", CASES)
def test_full_bf16(algo, axis):
    """--full_bf16: model and network in bf16, no autocast; a step leaves finite bf16 gradients."""
    want = reference(algo, axis)
    block, net = adapted(algo, axis)
    block.to(DEVICE, torch.bfloat16)
    net.to(DEVICE, torch.bfloat16)
    out = block(*inputs(DEVICE, torch.bfloat16))
    close(out, want, 3e-2)
    sum(o.float().square().sum() for o in out).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", ["structured", "fold"])
@pytest.mark.parametrize("algo,axis", CASES)
def test_fp8_base(algo, axis, path):
    """sd-scripts' --fp8_base: the frozen weights are float8_e4m3fn, the step runs under bf16 autocast.
    The reference is the same network over the dequantised (fp8 -> fp32) weights: the adapter, its
    DoRA norms and a folded weight must read the weight as it is stored, not as it was before."""
    block, net = adapted(algo, axis, path=path)
    for layer in (block.lin, block.conv):
        layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    ref_block, ref_net = adapted(algo, axis, path=path)
    for name in ("lin", "conv"):
        getattr(ref_block, name).weight.data = getattr(block, name).weight.data.float()
    with torch.no_grad():
        for a, b in zip(ref_net.parameters(), net.parameters()):
            a.copy_(b)
    want = [o.detach() for o in ref_block(*inputs("cpu"))]
    block.to(DEVICE)
    net.to(DEVICE)
    with torch.autocast(torch.device(DEVICE).type, torch.bfloat16):
        out = block(*inputs(DEVICE))
    close(out, want, 3e-2)


# on the CPU, tests/test_compile.py already compiles these steps in the fast core: here they join the slow set
SLOW_ON_CPU = [pytest.mark.slow] if DEVICE == "cpu" else []


@pytest.mark.parametrize("algo,axis", [pytest.param("locon", None, marks=SLOW_ON_CPU),
                                       pytest.param("lokr", "input", marks=SLOW_ON_CPU)])
def test_compiled_step(algo, axis):
    want = reference(algo, axis)
    block, net = adapted(algo, axis)
    block.to(DEVICE)
    net.to(DEVICE)
    compiled = torch.compile(block)
    out = compiled(*inputs(DEVICE))
    close(out, want, 1e-4)
    sum(o.square().sum() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
