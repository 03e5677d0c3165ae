"""NaN/Inf in an adapter: named by the norm methods (training stops at that step) and refused by
save_weights (the previous file stays byte-identical)."""
import os

import pytest
import torch

import lycoris_kohya

from conftest import randomize
from test_algorithms import ToyUNet


def network(**kw):
    unet = ToyUNet()
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, **kw)
    randomize(net, seed=3, std=0.2)
    net.apply_to([], unet)
    return net


CASES = [  # (network args, module suffix, tensor, value)
    ({"algo": "locon"}, "lin", "lora_up.weight", float("nan")),
    ({"algo": "loha"}, "conv", "hada_w1_a", float("inf")),
    ({"algo": "lokr", "use_tucker": "true"}, "conv_s2", "lokr_t2", float("-inf")),
    ({"algo": "locon", "dora_wd": "true"}, "pw", "dora_scale", float("nan")),
    ({"algo": "loha", "use_scalar": "true"}, "lin_odd", "scalar", float("nan")),
]


def poison(net, suffix, tensor, value):
    a = [a for a in net.loras if a.lora_name == f"lora_unet_block_{suffix}"][0]
    p = dict(a.named_parameters())[tensor]
    with torch.no_grad():
        p.view(-1)[0] = value
    return f"{a.lora_name}.{tensor}"


@pytest.mark.parametrize("args,suffix,tensor,value", CASES)
def test_max_norm_names_the_non_finite_tensor_and_changes_nothing(args, suffix, tensor, value):
    net = network(**args)
    key = poison(net, suffix, tensor, value)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError, match=key.replace(".", r"\.")):
        net.apply_max_norm_regularization(1e-6, "cpu")  # every module would be rescaled
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k != key)  # nothing half-rescaled


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
@pytest.mark.parametrize("args,suffix,tensor,value", CASES)
def test_save_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path, args, suffix, tensor, value, ext):
    net = network(**args)
    path = tmp_path / f"n{ext}"
    net.save_weights(str(path), torch.float32, {})
    old = path.read_bytes()
    poison(net, suffix, tensor, value)
    name = f"lora_unet_block_{suffix}"
    with pytest.raises(ValueError, match=f"refusing to write .*n{ext}: {name}"):
        net.save_weights(str(path), torch.float32, {})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]


def test_save_refuses_a_dtype_the_values_overflow(tmp_path):
    net = network(algo="lokr")
    a = net.loras[0]
    with torch.no_grad():
        next(iter(a.tensors().values())).view(-1)[0] = 1e6  # finite, beyond float16's 65504
    path = tmp_path / "n.safetensors"
    with pytest.raises(ValueError, match=rf"{a.lora_name}\.\S+ is finite but overflows torch.float16"):
        net.save_weights(str(path), torch.float16, {})
    assert not path.exists() and os.listdir(tmp_path) == []
    net.save_weights(str(path), torch.bfloat16, {})  # bf16 holds it
    assert path.exists()
