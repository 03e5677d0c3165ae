"""specs.py: a file's modules read without a model. Every layout's g*dW, norm and merged weight
equal the closed forms of SPEC section 3 (tests/test_algorithms.reference_delta and
tests/test_dora.trained_weight, written independently of the package); shapes are inferred from
the tensors exactly when they determine them; weights.py no longer imports the network."""
import ast
import os

import pytest
import torch

from lycoris_kohya import specs as sp

from test_algorithms import LAYOUTS, ToyUNet, build, reference_delta
from test_dora import build as build_dora
from test_dora import trained_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {f"lora_unet_block_{n}": tuple(getattr(ToyUNet().block, n).weight.shape)
          for n in ("lin", "lin_odd", "pw", "conv", "conv_s2")}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add(("." * node.level) + (node.module or ""))
            out.update(f"{'.' * node.level}{node.module or ''}.{a.name}".replace("..", ".") for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_weights_module_does_not_import_the_network_or_specs():
    imports = _imports(os.path.join(ROOT, "lycoris_kohya", "weights.py"))
    assert not [i for i in imports if "network" in i or "kohya" in i or "specs" in i or "algos" in i], imports
    spec_imports = _imports(os.path.join(ROOT, "lycoris_kohya", "specs.py"))
    assert not [i for i in spec_imports if "network" in i or "kohya" in i], spec_imports


def _expected_shape_known(name, sd):
    """Which modules' tensors determine the layer's shape (the rules in specs' docstring)."""
    t = {k[len(name) + 1:] for k in sd if k.startswith(name + ".")}
    if "lora_down.weight" in t or "hada_t1" in t or "lokr_t2" in t or "lokr_w2" in t:
        return True
    return False


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_read_without_a_model(layout):
    unet, net = build(layout)
    sd = net.export_state_dict()
    modules = sp.read_modules(sd)
    assert set(modules) == {a.lora_name for a in net.loras}
    for a in net.loras:
        m = modules[a.lora_name]
        shape = SHAPES[a.lora_name]
        g, dw = reference_delta(sd, a.lora_name, shape)
        assert m.algo == a.algo and m.alpha == pytest.approx(float(sd[a.lora_name + ".alpha"]))
        if a.algo != "lokr" or a.layout.use_alpha:  # both LoKr factors full: no rank is stored (g = 1)
            assert m.rank == a.rank
        assert m.scale == pytest.approx(g)
        if _expected_shape_known(a.lora_name, sd):
            assert m.weight_shape == shape, (layout, a.lora_name)
        else:
            assert m.weight_shape is None, (layout, a.lora_name, m.weight_shape)
            with pytest.raises(sp.ShapeUnknown, match=a.lora_name):
                m.delta()
        # the flat g*dW is exact whatever is known
        assert torch.allclose(m.delta_flat(), (g * dw).reshape(shape[0], -1), atol=1e-6, rtol=1e-5), layout
        assert m.norm() == pytest.approx(float((g * dw).norm()), rel=1e-5)
        assert m.norm() == pytest.approx(a.delta_norm(), rel=1e-5)
        fitted = m.fit(shape)
        assert fitted.weight_shape == shape
        assert torch.allclose(fitted.delta(), g * dw, atol=1e-6, rtol=1e-5)
        w0 = a.layer.weight.detach()
        assert torch.allclose(m.merged(w0, 0.5), w0 + 0.5 * g * dw, atol=1e-6, rtol=1e-5)
        assert torch.equal(m.merged(w0, 0.0), w0)


def test_specs_from_model_shapes_equal_the_networks():
    for layout in LAYOUTS:
        unet, net = build(layout)
        specs = sp.infer_specs(net.export_state_dict(), SHAPES)
        for a in net.loras:
            s = specs[a.lora_name]
            assert (s.algo, s.dora_axis) == (a.algo, None)
            if a.algo == "lokr":
                assert s.layout.use_alpha == a.layout.use_alpha
                if a.layout.use_alpha:
                    assert s.layout == a.layout and s.rank == a.rank
            else:
                assert s.layout == a.layout


@pytest.mark.parametrize("algo", ["locon", "locon_tucker", "loha", "lokr", "lokr_tucker"])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_dora_merged_weight_both_axes(algo, axis):
    unet, net = build_dora(algo, axis)
    sd = net.export_state_dict()
    modules = sp.read_modules(sd)
    for a in net.loras:
        m = modules[a.lora_name]
        assert m.dora_axis == axis
        shape = SHAPES[a.lora_name]
        g, dw = reference_delta(sd, a.lora_name, shape)
        w0 = a.layer.weight.detach()
        for mult in (0.0, 0.5, 1.0):
            want = trained_weight(w0, g, dw, sd[a.lora_name + ".dora_scale"], mult, axis)
            assert torch.allclose(m.merged(w0, mult), want, atol=1e-5, rtol=1e-5), (algo, axis, a.lora_name, mult)
            assert torch.allclose(m.change(w0, mult), want - w0, atol=1e-5, rtol=1e-5)
        if axis == "input" and m.weight_shape is not None:
            assert m.weight_shape == shape  # an input-axis dora_scale names the input dim


def test_dora_input_axis_tells_a_loha_conv_kernel():
    unet, net = build_dora("loha", "input")
    modules = sp.read_modules(net.export_state_dict())
    assert modules["lora_unet_block_conv"].weight_shape == (24, 32, 3, 3)
    assert modules["lora_unet_block_lin"].weight_shape == (48, 64)
    assert modules["lora_unet_block_pw"].weight_shape == (24, 32, 1, 1)
    _, out_net = build_dora("loha", "output")
    out_modules = sp.read_modules(out_net.export_state_dict())
    assert out_modules["lora_unet_block_lin"].weight_shape == (48, 64)  # a 2-D dora_scale: a Linear
    assert out_modules["lora_unet_block_conv"].weight_shape is None  # [out,1,1,1]: kernel unknown
    assert out_modules["lora_unet_block_conv"].dora_axis == "output"


def test_missing_alpha_means_scale_one():
    unet, net = build("locon")
    sd = {k: v for k, v in net.export_state_dict().items() if not k.endswith(".alpha")}
    for name, m in sp.read_modules(sd).items():
        assert m.alpha is None and m.scale == 1.0
        assert m.spec.alpha == float(m.rank)


def test_errors_name_the_module():
    unet, net = build("locon")
    sd = net.export_state_dict()
    with pytest.raises(ValueError, match="no layer for module 'lora_unet_block_lin'"):
        sp.infer_specs(sd, {k: v for k, v in SHAPES.items() if k != "lora_unet_block_lin"})
    bad = dict(SHAPES, lora_unet_block_lin=(48, 65))
    with pytest.raises(ValueError, match="lora_unet_block_lin: lora_down.weight has shape"):
        sp.infer_specs(sd, bad)
    with pytest.raises(ValueError, match="lora_unet_block_lin: unrecognised tensors"):
        sp.read_modules({"lora_unet_block_lin.weird": torch.zeros(1)})
    with pytest.raises(ValueError, match="not '<module>.<tensor>'"):
        sp.read_modules({"nodot": torch.zeros(1)})


def test_full_difference_modules():
    d = torch.randn(6, 4, 3, 3)
    m = sp.read_modules({"lora_unet_x.diff": d})["lora_unet_x"]
    assert m.algo == sp.DIFF and m.weight_shape == (6, 4, 3, 3)
    w0 = torch.randn(6, 4, 3, 3)
    assert torch.allclose(m.merged(w0, 0.3), w0 + 0.3 * d)
    assert m.norm() == pytest.approx(float(d.norm()), rel=1e-6)
    with pytest.raises(ValueError, match="not a trainable adapter"):
        m.spec
