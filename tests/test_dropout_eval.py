"""Dropouts act in training only: in eval mode a network with neuron, rank and module dropout gives
the same output on every call, equal to the same weights without any dropout."""
import pytest
import torch

import lycoris_kohya

from conftest import randomize
from test_algorithms import INPUTS, ToyUNet

ALGOS = {"locon": {"algo": "locon"}, "locon_tucker": {"algo": "locon", "use_tucker": "true"},
         "loha": {"algo": "loha"}, "lokr": {"algo": "lokr"},
         "locon_dora": {"algo": "locon", "dora_wd": "true"}, "loha_dora": {"algo": "loha", "dora_wd": "true"},
         "lokr_dora": {"algo": "lokr", "dora_wd": "true"}}
DROPOUTS = {"neuron": {"dropout": "0.5"}, "rank": {"rank_dropout": "0.5"}, "module": {"module_dropout": "0.5"},
            "all": {"dropout": "0.5", "rank_dropout": "0.5", "module_dropout": "0.5"}}


def pair(args, drop):
    """The same weights twice: with the dropouts and without."""
    unets, nets = [], []
    for extra in (drop, {}):
        unet = ToyUNet()
        net = lycoris_kohya.create_network(1.0, 4, 2.0, None, [], unet, **args, **extra)
        randomize(net, seed=9, std=0.2)
        net.apply_to([], unet)
        unets.append(unet)
        nets.append(net)
    return unets, nets


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("drop", list(DROPOUTS))
def test_eval_is_deterministic_and_dropout_free(algo, drop):
    (unet, plain_unet), (net, plain) = pair(ALGOS[algo], DROPOUTS[drop])
    net.eval(), plain.eval()
    torch.manual_seed(0)
    for name, make_x in INPUTS.items():
        x = make_x()
        layer = getattr(unet.block, name)
        with torch.no_grad():
            first = layer(x)
            for _ in range(3):
                assert torch.equal(layer(x), first), (algo, drop, name)
            assert torch.equal(first, getattr(plain_unet.block, name)(x)), (algo, drop, name)
    # the dropouts are real in training (so the eval check above means something)
    net.train()
    x = INPUTS["lin"]()
    with torch.no_grad():
        outs = [unet.block.lin(x) for _ in range(6)]
    varies = any(not torch.equal(o, outs[0]) for o in outs[1:])
    assert varies, (algo, drop)
