"""sd-scripts' --torch_compile compiles the U-Net with the adapters' hooks inside. The adapters'
forward must trace as one graph (fullgraph=True fails on any graph break), must not recompile from
step to step (module/rank dropout draw random numbers, they do not branch on them), and must give
the eager results, with dropouts too: under the same seed a compiled layer draws what the eager one
draws (module_dropout's draw first, then the masks), so outputs and gradients are equal."""
import pytest
import torch

import lycoris_kohya

from conftest import randomize
from test_algorithms import ToyUNet

# compiling costs seconds per case: two in the fast core, the rest in the slow set (CI runs both)
FAST = [("locon", {}), ("lokr", {"dora_wd": "true"})]
CASES = FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in [
    ("locon", {"use_tucker": "true"}), ("loha", {}), ("lokr", {}), ("lokr", {"use_tucker": "true"}),
    ("locon", {"dora_wd": "true"}), ("lokr", {"dora_wd": "true", "wd_on_output": "true"}),
    ("loha", {"dora_wd": "true"}),
    ("locon", {"forward_path": "fold"}), ("lokr", {"forward_path": "fold", "dora_wd": "true"}),
]]
# one adapted layer per compiled call: eager code skips the draws of a module that module_dropout
# drops, compiled code makes them and multiplies by 0, so after a dropped module the streams of two
# layers in one graph part (both are right; only a single layer's numbers can be compared)
DROPOUT_CASES = [
    pytest.param("loha", {"rank_dropout": "0.3", "module_dropout": "0.5", "dropout": "0.1"}, "lin",
                 marks=pytest.mark.slow),
    pytest.param("locon", {"module_dropout": "0.5"}, "conv", marks=pytest.mark.slow),
    ("lokr", {"dora_wd": "true", "rank_dropout": "0.4", "module_dropout": "0.5"}, "lin"),
]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.u = ToyUNet()

    def forward(self, a, b):
        blk = self.u.block
        return (blk.lin(a) ** 2).sum() + (blk.conv(b) ** 2).sum() + (blk.conv_s2(b[:, :16]) ** 2).sum()


def network(algo, extra, seed=0):
    torch.manual_seed(seed)
    m = Model()
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], m.u, algo=algo, **extra)
    randomize(net, std=0.1)
    net.apply_to([], m.u)
    net.train()
    return m, net


@pytest.mark.parametrize("algo,extra", CASES)
def test_compiles_as_one_graph_without_recompiling_and_matches_eager(algo, extra):
    a, b = torch.randn(3, 5, 64), torch.randn(2, 32, 6, 6)
    eager, enet = network(algo, extra)
    comp, cnet = network(algo, extra)
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    try:
        for step in range(3):
            torch.manual_seed(step)  # the same dropout draws in both
            ye = eager(a, b)
            ye.backward()
            torch.manual_seed(step)
            yc = compiled(a, b)
            yc.backward()
            if step == 0:
                torch._dynamo.config.error_on_recompile = True
            assert torch.allclose(yc, ye, rtol=1e-5), (yc, ye)
            used = 0
            for pe, pc in zip(enet.parameters(), cnet.parameters()):
                if pe.grad is None:  # lin_odd and pw are not called by Model
                    assert pc.grad is None
                    continue
                used += 1
                assert torch.allclose(pc.grad, pe.grad, rtol=1e-4, atol=1e-6)
            assert used >= 6
    finally:
        torch._dynamo.config.error_on_recompile = False


class OneLayer(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.u, self.name = ToyUNet(), name

    def forward(self, x):
        return getattr(self.u.block, self.name)(x)


@pytest.mark.parametrize("algo,extra,layer", DROPOUT_CASES)
def test_compiled_dropouts_draw_what_eager_draws(algo, extra, layer):
    """Seeded training steps with module, rank and neuron dropout: compiled and eager outputs and
    gradients are equal step by step, over steps where module_dropout drops the module (the output is
    then the base layer's) and steps where it keeps it."""
    x = torch.randn(3, 5, 64) if layer == "lin" else torch.randn(2, 32, 6, 6)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = OneLayer(layer)
        net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], m.u, algo=algo, **extra)
        randomize(net, std=0.1)
        net.apply_to([], m.u)
        net.train()
        models.append((m, net))
    (eager, enet), (comp, cnet) = models
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    lay = getattr(eager.u.block, layer)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, lay.weight, lay.bias) if layer == "lin" else \
            torch.nn.functional.conv2d(x, lay.weight, lay.bias, lay.stride, lay.padding)
    dropped = kept = 0
    try:
        for step in range(4):  # seeds 0 and 3 draw below 0.5 first: the module is dropped
            enet.zero_grad(set_to_none=True)
            cnet.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            ye = eager(x)
            (ye ** 2).sum().backward()
            torch.manual_seed(step)
            yc = compiled(x)
            (yc ** 2).sum().backward()
            if step == 0:
                torch._dynamo.config.error_on_recompile = True
            assert torch.allclose(yc, ye, rtol=1e-5, atol=1e-6), (step, (yc - ye).abs().max())
            if torch.equal(ye, base):
                dropped += 1
            else:
                kept += 1
            for pe, pc in zip(enet.parameters(), cnet.parameters()):
                ge = torch.zeros_like(pe) if pe.grad is None else pe.grad  # a dropped module: no grad / zero
                gc = torch.zeros_like(pc) if pc.grad is None else pc.grad
                assert torch.allclose(gc, ge, rtol=1e-4, atol=1e-6), step
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert dropped and kept, (dropped, kept)
