"""One generator over the options that change a forward, run on every forward path.

A covering design (``CASES``, deterministic) over algorithm x layer kind x DoRA axis x dtype x
multiplier x dora_detach_norm x bypass_mode x dropout / rank_dropout / module_dropout x use_scalar x
rs_lora x use_tucker x LoKr full_matrix: every pair of option values appears in some case, and so
does every combination within the groups of ``GROUPS`` (e.g. algorithm x layer x DoRA axis in full). Each
case builds the same network (same values) with forward_path=auto, fold and structured and checks,
through the public API only, against the merged weight written here from SPEC section 3
(tests/oracle.py's closed-form dW; g = alpha/r, rs_lora alpha/sqrt(r), g = 1 for a LoKr with both
factors full; DoRA W0 + m*(V*scale/||V|| - W0), V = W0 + g*dW, the norm a constant with
dora_detach_norm; use_scalar multiplies dW):

  * eval, no grad: the output;
  * eval and train (no dropout drawn), with grad: the output and the gradient of <y, R> for the
    input and every trainable tensor, against autograd through the closed form on fp32 copies of
    the adapter's own values, and fold vs structured vs auto against each other;
  * train with dropouts, under fixed seeds: every path draws the same masks (same outputs and
    gradients); a call that module_dropout drops is the base output with no gradient; without neuron
    dropout, each sample's output is the closed form with some subset of rank components kept and
    scaled by 1/(1-p) (one subset per sample; with DoRA one per call, taken in the weight before
    the norm), and the gradients are those of the closed form with the identified subsets; with
    neuron dropout, samples differ and the mean over many copies of one sample is the closed form
    (dropouts are unbiased), gradients included;
  * bypass_mode: the layer's own forward is what computes the base (a quantised-like base that the
    merged weight would not reproduce), so the output is base(x) + delta(x) on every path.

Then the bugs that once survived the suite, one test each (see the test names).
"""
import itertools
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import lycoris_kohya
from lycoris_kohya.pipeline import LycorisAdapters

from oracle import column_norm, reference_delta, row_norm

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Layers this small run fastest on one thread (with two, OpenMP's hand-offs cost more than the
    work, 100x more on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RANK, ALPHA, CONV_ALPHA = 4, 3.0, 1.5  # kxk convs: conv_dim=RANK, conv_alpha=CONV_ALPHA
PATHS = ("auto", "fold", "structured")
BF16 = torch.bfloat16

# ----- the covering design ----------------------------------------------------------------------
FACTORS = (
    ("algo", ("locon", "loha", "lokr")),
    ("layer", ("lin", "lin_odd", "pw", "conv", "conv_s2")),
    ("dora", ("none", "input", "output")),
    # base/network dtypes and autocast: bf16 = base and network in bf16 (no autocast); autocast = fp32
    # base and network under bf16 autocast; full_bf16 = both (sd-scripts --full_bf16 --mixed_precision bf16)
    ("dtype", ("fp32", "bf16", "autocast", "full_bf16")),
    ("m", (1.0, 0.5)),
    ("detach", (False, True)),
    ("bypass", (False, True)),
    ("dropout", (None, 0.3)),
    ("rank_dropout", (None, 0.4)),
    ("module_dropout", (None, 0.5)),
    ("use_scalar", (False, True)),
    ("rs_lora", (False, True)),
    ("use_tucker", (False, True)),
    ("full_matrix", (False, True)),
)
NAMES = tuple(f for f, _ in FACTORS)
VALUES = dict(FACTORS)
KXK = ("conv", "conv_s2")
DROPOUTS = ("dropout", "rank_dropout", "module_dropout")
#: groups covered in full (every feasible combination of their values), on top of every pair; the last
#: one decides which path a training call may take (fold: no bypass, no neuron dropout, and rank
#: dropout only with DoRA, where its mask is in the weight)
GROUPS = (("algo", "layer", "dora"), ("algo", "dora", "detach"), ("algo", "dora", "dtype"), ("algo", "dora", "m"),
          ("algo", "dora", "use_scalar"), ("algo", "use_tucker", "dora"), ("algo", "use_tucker", "dtype"),
          ("dora", "bypass", "rank_dropout", "dropout"))


def violates(row):
    """The combinations that are refused or mean nothing (partial rows: only assigned keys count)."""
    def on(*keys):
        return all(k in row for k in keys)

    r = row.get
    return any((
        on("bypass", "dora") and r("bypass") and r("dora") != "none",  # refused (ConfigError)
        on("detach", "dora") and r("detach") and r("dora") == "none",  # no effect without DoRA
        on("full_matrix", "algo") and r("full_matrix") and r("algo") != "lokr",  # refused
        on("use_tucker", "layer") and r("use_tucker") and r("layer") not in KXK,  # no effect
        on("use_tucker", "full_matrix") and r("use_tucker") and r("full_matrix"),  # no effect
        # reduced precision without dropouts: their checks need fp32 to tell masks apart
        *(on("dtype", k) and r("dtype") != "fp32" and r(k) is not None for k in DROPOUTS),
    ))


def completable(row):
    if violates(row):
        return False
    for f in NAMES:
        if f not in row:
            return any(completable({**row, f: v}) for v in VALUES[f])
    return True


def required_tuples():
    groups = list(itertools.combinations(NAMES, 2)) + list(GROUPS)
    out = []
    for fs in groups:
        for vs in itertools.product(*(VALUES[f] for f in fs)):
            t = tuple(zip(fs, vs))
            if completable(dict(t)):
                out.append(t)
    return out


def _covers(row, t):
    return all(f in row and row[f] == v for f, v in t)


def covering_design():
    """Greedy and deterministic: start a case from the first uncovered tuple, then give each other
    factor (in order) the first value that covers the most uncovered tuples and keeps it valid."""
    todo = required_tuples()
    rows = []
    while todo:
        row = dict(todo[0])
        for f in NAMES:
            if f in row:
                continue
            best, gain = None, -1
            for v in VALUES[f]:
                cand = {**row, f: v}
                if completable(cand):
                    n = sum(1 for t in todo if (f, v) in t and _covers(cand, t))
                    if n > gain:
                        best, gain = v, n
            row[f] = best
        rows.append(row)
        todo = [t for t in todo if not _covers(row, t)]
    return [SimpleNamespace(**r) for r in rows]


def case_id(c):
    parts = [c.algo, c.layer, c.dtype]
    if c.dora != "none":
        parts.append(f"dora_{c.dora}" + ("_detach" if c.detach else ""))
    if c.m != 1.0:
        parts.append(f"m{c.m:g}")
    parts += [k for k in ("bypass", "use_scalar", "rs_lora", "use_tucker", "full_matrix") if getattr(c, k)]
    parts += [f"{k}{getattr(c, k):g}" for k in DROPOUTS if getattr(c, k) is not None]
    return "-".join(parts)


CASES = covering_design()


def test_the_design_covers_every_required_tuple_with_valid_cases():
    rows = [vars(c) for c in CASES]
    assert all(not violates(r) and set(r) == set(NAMES) for r in rows)
    missing = [t for t in required_tuples() if not any(_covers(r, t) for r in rows)]
    assert not missing, missing[:5]
    assert len({case_id(c) for c in CASES}) == len(CASES)
    assert len(CASES) <= 60, len(CASES)  # a covering design, not the product (184320 combinations)


# ----- the model: one layer under the class the default preset adapts ---------------------------
LAYERS = {
    "lin": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "lin_odd": (lambda: nn.Linear(15, 7), (3, 15)),  # 3 tokens <= rank: LoHa's few-token path
    "pw": (lambda: nn.Conv2d(16, 24, 1), (2, 16, 4, 4)),
    "conv": (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 5, 5)),
    "conv_s2": (lambda: nn.Conv2d(16, 20, 3, stride=2, padding=1), (2, 16, 7, 7)),
}


class Transformer2DModel(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


class ToyUNet(nn.Module):
    def __init__(self, kind="lin", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block = Transformer2DModel(LAYERS[kind][0]())
        self.requires_grad_(False)


def is_kxk(layer):
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def op(layer, x, w, bias="layer"):
    b = (None if layer.bias is None else layer.bias.detach().to(x.dtype)) if isinstance(bias, str) else bias
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w.to(x.dtype), b, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, w.to(x.dtype), b)


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----- the closed form (SPEC section 3), on a module's tensors under their file suffixes ----------
def held(net):
    """{suffix: live tensor} of the network's single module (parameters and the alpha buffer)."""
    (a,) = net.loras
    prefix = a.lora_name + "."
    return a, {k[len(prefix):]: v for k, v in net.state_dict(keep_vars=True).items() if k.startswith(prefix)}


def trainable(t):
    """The trainable tensors' suffixes (live parameters, or their fp32 copies that require grad)."""
    return [k for k, v in t.items() if isinstance(v, nn.Parameter) or v.requires_grad]


def scalar_key(t):
    """use_scalar's trainable scalar: the one 0-d tensor besides alpha."""
    keys = [k for k in t if t[k].dim() == 0 and k != "alpha"]
    return keys[0] if keys else None


def factor_keys(t):
    """The factors of dW, under their file suffixes."""
    return sorted(k for k in t if k != "dora_scale" and t[k].dim() > 0)


def expected_alpha(c, layer):
    """The alpha the file stores: network_alpha (conv_alpha for kxk convs), times sqrt(r) with rs_lora;
    1 for a LoKr with both factors full (g = 1 there, and 1 is what every reading of alpha agrees on)."""
    if c.algo == "lokr" and c.full_matrix:
        return 1.0
    alpha = CONV_ALPHA if is_kxk(layer) else ALPHA
    return alpha * math.sqrt(RANK) if c.rs_lora else alpha


def expected_gain(c, layer):
    if c.algo == "lokr" and c.full_matrix:
        return 1.0  # both Kronecker factors full: alpha is ignored
    return expected_alpha(c, layer) / RANK


def component(c, t):
    """(tensor, dim) whose slices are the rank components (README): LoCon the columns of lora_up, LoHa
    the rows of hada_w2_b, LoKr the rows of lokr_w2_b, or of lokr_w2 when it is full."""
    if c.algo == "locon":
        return "lora_up.weight", 1
    if c.algo == "loha":
        return "hada_w2_b", 0
    return ("lokr_w2_b", 0) if "lokr_w2_b" in t else ("lokr_w2", 0)


def n_components(c, t):
    key, dim = component(c, t)
    return t[key].shape[dim]


def masked(c, t, keep, p):
    key, dim = component(c, t)
    shape = [1] * t[key].dim()
    shape[dim] = -1
    out = dict(t)
    out[key] = t[key] * torch.tensor(keep, dtype=t[key].dtype).reshape(shape) / (1 - p)
    return out


def closed_form_delta(c, t, layer):
    """g * dW (times the scalar with use_scalar), fp32, differentiable in t."""
    shape = layer.weight.shape
    _, dw = reference_delta({f"m.{k}": t[k] for k in factor_keys(t)}, "m", shape)  # no alpha: g = 1 here
    g = expected_gain(c, layer)
    s = scalar_key(t)
    return g * dw * (t[s].float() if s else 1.0)


def axis_norm(v, axis):
    return column_norm(v) if axis == "input" else row_norm(v)


def closed_form_weight(c, t, layer, keep=None, m=None, w0=None):
    m = c.m if m is None else m
    w0 = layer.weight.detach().float() if w0 is None else w0
    if keep is not None:
        t = masked(c, t, keep, c.rank_dropout)
    gdw = closed_form_delta(c, t, layer)
    if c.dora == "none":
        return w0 + m * gdw
    v = w0 + gdw
    n = axis_norm(v, c.dora)
    if c.detach:
        n = n.detach()
    return w0 + m * (v * t["dora_scale"].float().reshape(n.shape) / n - w0)


def quantised(w):
    """What a quantised base computes with instead of its stored weight (a 1/16 grid)."""
    return torch.round(w * 16) / 16


class QuantisedBase(TorchFunctionMode):
    """The layer's own forward (F.linear / F.conv2d called with ``layer.weight``) computes with the
    quantised weight, as a quantised layer's forward would; a merged weight never goes through it.
    Counts those calls."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.calls = layer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d) and len(args) > 1 and args[1] is self.layer.weight:
            self.calls += 1
            args = (args[0], quantised(args[1]), *args[2:])
        return func(*args, **kwargs)


def expected_output(c, layer, t, x, keep=None, w=None):
    """The layer's output under the closed form, fp32 (bypass: over the quantised base)."""
    w0 = layer.weight.detach().float()
    w = closed_form_weight(c, t, layer, keep) if w is None else w
    if c.bypass:
        w = w + quantised(w0) - w0
    return op(layer, x.float(), w, None if layer.bias is None else layer.bias.detach().float())


def base_output(c, layer, x):
    w0 = layer.weight.detach()
    return op(layer, x, quantised(w0) if c.bypass else w0)


# ----- building the same network for every path ----------------------------------------------------
def network_args(c, path):
    args = {"algo": c.algo, "forward_path": path, "conv_dim": str(RANK), "conv_alpha": str(CONV_ALPHA)}
    if c.dora != "none":
        args["dora_wd"] = "true"
        args["wd_on_output"] = str(c.dora == "output")
    if c.detach:
        args["dora_detach_norm"] = "true"
    if c.bypass:
        args["bypass_mode"] = "true"
    for k in DROPOUTS:
        if getattr(c, k) is not None:
            args[k] = str(getattr(c, k))
    for k in ("use_scalar", "rs_lora", "use_tucker"):
        if getattr(c, k):
            args[k] = "true"
    if c.algo == "lokr":  # factor 2 keeps w2 low-rank at rank 4 on these widths
        args.update({"full_matrix": "true"} if c.full_matrix else {"factor": "2"})
    return args


def set_values(c, a, t, seed=0):
    """Trained-looking values: random factors scaled so that ||g*dW|| = ||W0||/2, a scalar away from
    0 and 1, magnitudes within 10% of ||W0||."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in sorted(trainable(t)):
            if k == scalar_key(t):
                t[k].fill_(0.6 + 0.3 * float(torch.rand((), generator=gen)))
            elif k != "dora_scale":
                t[k].copy_(torch.randn(t[k].shape, generator=gen) * 0.3)
        w0 = a.layer.weight.detach().float()
        first = factor_keys(t)[0]  # dW is linear in each factor
        t[first].mul_(0.5 * float(w0.norm() / closed_form_delta(c, t, a.layer).norm()))
        if c.dora != "none":
            n = axis_norm(w0, c.dora)
            noise = 1 + 0.2 * (torch.rand(n.shape, generator=gen) - 0.5)
            t["dora_scale"].copy_((n * noise).reshape(t["dora_scale"].shape))


def build(c, path, seed=0):
    unet = ToyUNet(c.layer)
    net = lycoris_kohya.create_network(c.m, RANK, ALPHA, None, [], unet, **network_args(c, path))
    a, t = held(net)
    set_values(c, a, t, seed)
    if c.dtype in ("bf16", "full_bf16"):
        unet.to(BF16)
        net.to(BF16)
    net.apply_to([], unet, True, True)
    a, t = held(net)
    return SimpleNamespace(net=net, a=a, layer=a.layer, t=t, path=path)


def in_dtype(c):
    return BF16 if c.dtype in ("bf16", "full_bf16") else torch.float32


def run(c, layer, x):
    """The layer's forward as the trainer calls it (autocast where the case has it)."""
    ac = torch.autocast("cpu", dtype=BF16) if c.dtype in ("autocast", "full_bf16") else nullcontext()
    quant = QuantisedBase(layer) if c.bypass else None
    with ac, (quant or nullcontext()):
        y = layer(x)
    if quant is not None:
        assert quant.calls >= 1, "bypass_mode: the layer's own forward was not called"
    return y


def fp32_copies(t):
    return {k: (v.detach().float().requires_grad_(isinstance(v, nn.Parameter))) for k, v in t.items()}


def with_grads(fn, x, tensors, probe):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad((y.float() * probe).sum(), [x] + list(tensors), allow_unused=True)
    return y, grads


# relative L2 errors allowed, about 3x the worst measured (torch 2.13, CPU): fp32 outputs 3e-7, the
# adapter's share of them 1.3e-6, gradients 5.6e-7 over CASES and 2.1e-6 over the 256 positions of the
# bypass test (use_scalar's scalar, one cancelling sum over the whole weight, 7e-6); bf16 outputs 4.6e-3,
# shares 1.6e-2, gradients 9.4e-3 (the scalar 7e-2: bf16 has 8 significant bits). A wrong path is off
# by O(1).
TOL = {"fp32": dict(out=1e-6, share=5e-6, grad=1e-5, scalar=3e-5)}
TOL.update(dict.fromkeys(("bf16", "autocast", "full_bf16"), dict(out=0.015, share=0.05, grad=0.03, scalar=0.2)))


def assert_grads(got, want, names, tol, where, margin=1.0):
    """Gradients (x first, then the named tensors) against the reference, each within its tolerance."""
    for n, g, w in zip(["x"] + list(names), got, want):
        if w is None or float(w.float().norm()) == 0:
            assert g is None or float(g.float().norm()) == 0, (where, n)
            continue
        assert g is not None, (where, n, "no gradient")
        limit = margin * tol["scalar" if w.dim() == 0 else "grad"]
        assert rel(g, w) < limit, (where, n, rel(g, w), limit)


def out_dtype(c):
    """What the base layer gives in the case's precision."""
    return torch.float32 if c.dtype == "fp32" else BF16


def assert_dtype(c, y, where):
    assert y.dtype == out_dtype(c), (where, y.dtype)


def deterministic_checks(c, b, x, probe):
    """Eval (no grad, then grad) and train without dropouts: outputs and gradients vs the closed form."""
    tol = TOL[c.dtype]
    names = trainable(b.t)
    ref = fp32_copies(b.t)
    want = expected_output(c, b.layer, ref, x)
    _, want_grads = with_grads(lambda x: expected_output(c, b.layer, ref, x), x, [ref[k] for k in names], probe)
    base = base_output(c, b.layer, x).float()
    out = {}
    phases = ["eval"] + ([] if any(getattr(c, k) for k in DROPOUTS) else ["train"])
    for phase in phases:
        b.net.train(phase == "train")
        where = (case_id(c), b.path, phase)
        if phase == "eval":
            with torch.no_grad():
                y = run(c, b.layer, x)
            assert rel(y, want) < tol["out"], (where, "no grad", rel(y, want))
            assert_dtype(c, y, where)
        y, grads = with_grads(lambda x: run(c, b.layer, x), x, [b.t[k] for k in names], probe)
        assert_dtype(c, y, where)
        assert rel(y, want) < tol["out"], (where, rel(y, want))
        share = rel(y.float() - base, want - base)  # the adapter's part of the output
        assert share < tol["share"], (where, "delta share", share)
        assert_grads(grads, want_grads, names, tol, where)
        out[phase] = (y, grads)
    return out


@torch.no_grad()
def candidates(c, b, one):
    """{kept components: the output of one sample with only those kept (DoRA: in the weight)}."""
    t = fp32_copies(b.t)
    return {keep: expected_output(c, b.layer, t, one, keep=keep)
            for keep in itertools.product((0.0, 1.0), repeat=n_components(c, t))}


def match(y, options):
    keep = min(options, key=lambda k: rel(y, options[k]))
    return keep, rel(y, options[keep])


def dropout_checks(c, builds, shape, probe_one):
    """Train mode with the case's dropouts, under fixed seeds (fp32 cases)."""
    exact = c.dropout is None  # without neuron dropout every draw can be told from the outputs
    g = torch.Generator().manual_seed(11)
    one = torch.randn((1, *shape[1:]), generator=g)
    reps = 8 if exact else {"lin": 1024, "lin_odd": 4096}.get(c.layer, 256)  # about 4096 positions
    x = one.repeat(reps, *([1] * (one.dim() - 1)))
    probe = probe_one.repeat(reps, *([1] * (probe_one.dim() - 1)))
    s = builds["structured"]
    names = trainable(s.t)
    options = candidates(c, s, one) if c.rank_dropout else None
    skipped = kept = 0
    seen = set()
    per_sample = False
    for seed in range(10 if exact else 8):
        if not exact and kept == 2:
            break  # two calls of many copies each are enough for the means
        res = {}
        for path, b in builds.items():
            b.net.train()
            torch.manual_seed(seed)
            res[path] = with_grads(lambda x: run(c, b.layer, x), x, [b.t[k] for k in names], probe)
        where = (case_id(c), seed)
        y, grads = res["structured"]
        for path, (yp, gp) in res.items():  # every path draws the same masks
            assert torch.allclose(yp, y, atol=1e-5, rtol=1e-5), (where, path)
            for n, gg, gs in zip(["x"] + names, gp, grads):
                assert (gg is None) == (gs is None) and (gg is None or torch.allclose(gg, gs, atol=1e-5, rtol=1e-4)), \
                    (where, path, n)
        if c.module_dropout and torch.equal(y, base_output(c, s.layer, x)):
            skipped += 1  # the module sat this call out: nothing of it acts or gets a gradient
            assert all(gr is None or float(gr.norm()) == 0 for gr in grads[1:]), where
            continue
        kept += 1
        ref = fp32_copies(s.t)
        if exact:
            if c.rank_dropout is None:
                keeps = [None] * reps
            elif c.dora != "none":  # one mask per call, in the weight
                keep, err = match(y[:1], options)
                assert err < 1e-5, (where, "not the output of any subset of rank components", err)
                keeps = [keep] * reps
            else:  # one mask per sample
                keeps = []
                for i in range(reps):
                    keep, err = match(y[i:i + 1], options)
                    assert err < 1e-5, (where, i, "not the output of any subset of rank components", err)
                    keeps.append(keep)
                per_sample |= len(set(keeps)) > 1
            seen.update(keeps)

            def want_fn(x):
                ws = {k: closed_form_weight(c, ref, s.layer, keep=k) for k in set(keeps)}
                return torch.cat([expected_output(c, s.layer, ref, x[i:i + 1], w=ws[k]) for i, k in enumerate(keeps)])

            want, want_grads = with_grads(want_fn, x, [ref[k] for k in names], probe)
            assert rel(y, want) < TOL["fp32"]["out"], (where, rel(y, want))
            assert_grads(grads, want_grads, names, TOL["fp32"], where)
        else:
            # neuron dropout: per element, so samples differ; unbiased, so their mean is the closed form
            assert not torch.allclose(y[0], y[1]), (where, "every copy got the same dropout mask")
            keep = match(y.mean(0, keepdim=True), options)[0] if c.rank_dropout and c.dora != "none" else None
            base = base_output(c, s.layer, one)
            want, want_grads = with_grads(lambda x: expected_output(c, s.layer, ref, x, keep=keep), one,
                                          [ref[k] for k in names], probe_one)
            err = rel(y.mean(0, keepdim=True) - base, want - base)
            assert err < 0.1, (where, "the mean over copies is not the closed form", err)
            for n, gg, gw in zip(names, grads[1:], want_grads[1:]):
                assert rel(gg / reps, gw) < 0.15, (where, n, rel(gg / reps, gw))
    assert kept, (case_id(c), "module_dropout dropped every call")
    if exact and c.module_dropout:
        assert skipped, (case_id(c), "module_dropout never dropped the module")
    if exact and c.rank_dropout:
        assert len(seen) > 1, (case_id(c), "the same mask every time")
        assert per_sample or c.dora != "none", (case_id(c), "every sample got the same mask in each call")


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_option_combination_on_every_path(c):
    shape = LAYERS[c.layer][1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(in_dtype(c))
    builds = {path: build(c, path) for path in PATHS}
    s = builds["structured"]
    assert float(s.t["alpha"]) == expected_alpha(c, s.layer)  # the alpha a file will hold
    probe = torch.randn(op(s.layer, x.float(), s.layer.weight.float()).shape, generator=g)
    results = {path: deterministic_checks(c, b, x, probe) for path, b in builds.items()}
    # fold and structured agree with each other as closely as with the closed form
    for phase, (y, grads) in results["fold"].items():
        ys, gs = results["structured"][phase]
        assert rel(y, ys) < 2 * TOL[c.dtype]["out"], (phase, rel(y, ys))
        assert_grads(grads, gs, trainable(s.t), TOL[c.dtype], (case_id(c), "fold vs structured", phase), margin=2)
    if any(getattr(c, k) for k in DROPOUTS):
        probe_one = torch.randn((1, *probe.shape[1:]), generator=g)
        dropout_checks(c, builds, shape, probe_one)


# ----- bugs that once survived the suite, one test each --------------------------------------------
DEFAULT = {f: vs[0] for f, vs in FACTORS}
ALGOS = VALUES["algo"]


def case(**kw):
    c = SimpleNamespace(**{**DEFAULT, **kw})
    assert not violates(vars(c)), kw
    return c


def inputs(c, seed=5, tokens=None):
    shape = LAYERS[c.layer][1] if tokens is None else (1, tokens, LAYERS[c.layer][1][-1])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(in_dtype(c))


def probe_for(b, x, seed=6):
    shape = op(b.layer, x.float(), b.layer.weight.float()).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("algo", ALGOS)
def test_fold_path_honours_dora_detach_norm(algo, axis):
    """dora_detach_norm makes ||V|| a constant in backward on every path: the fold path's gradients
    equal the structured path's and the closed form with the norm detached (the factors' gradients
    differ from the attached ones by 13-22% here)."""
    c = case(algo=algo, layer="conv", dora=axis, detach=True)
    x = inputs(c)
    got = {}
    for path in ("fold", "structured"):
        b = build(c, path)
        b.net.train()
        names = trainable(b.t)
        got[path] = with_grads(lambda x: run(c, b.layer, x), x, [b.t[k] for k in names], probe_for(b, x))[1]
    ref = fp32_copies(b.t)
    wants = {}
    for detach in (True, False):
        cc = SimpleNamespace(**{**vars(c), "detach": detach})
        wants[detach] = with_grads(lambda x: expected_output(cc, b.layer, ref, x), x, [ref[k] for k in names],
                                   probe_for(b, x))[1]
    for path, grads in got.items():
        assert_grads(grads, wants[True], names, TOL["fp32"], (algo, axis, path))
    assert_grads(got["fold"], got["structured"], names, TOL["fp32"], (algo, axis, "fold vs structured"), margin=2)
    factors = [i + 1 for i, k in enumerate(names) if k != "dora_scale"]
    assert max(rel(wants[False][i], wants[True][i]) for i in factors) > 0.05  # the option matters here (13-22%)


@pytest.mark.parametrize("layer", ["lin", "conv"])
@pytest.mark.parametrize("algo", ALGOS)
def test_bypass_mode_never_folds_the_base_weight(algo, layer):
    """bypass_mode: whatever forward_path says, the layer's own forward computes the base (a quantised
    layer cannot be merged into) and the adapter adds delta(x): the output is base(x) + delta(x) with the
    quantised base, in eval without grad (where 'auto' would fold this many tokens) and in training."""
    c = case(algo=algo, layer=layer, bypass=True, m=0.5)
    x = inputs(c, tokens=64) if layer == "lin" else torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    for path in PATHS:
        b = build(c, path)
        names = trainable(b.t)
        ref = fp32_copies(b.t)
        want = expected_output(c, b.layer, ref, x)
        _, want_grads = with_grads(lambda x: expected_output(c, b.layer, ref, x), x, [ref[k] for k in names],
                                   probe_for(b, x))
        for training in (False, True):
            b.net.train(training)
            with torch.no_grad():
                y = run(c, b.layer, x)  # asserts that the layer's forward ran
            assert rel(y, want) < TOL["fp32"]["out"], (path, training, rel(y, want))
            y, grads = with_grads(lambda x: run(c, b.layer, x), x, [b.t[k] for k in names], probe_for(b, x))
            assert rel(y, want) < TOL["fp32"]["out"], (path, training, rel(y, want))
            assert_grads(grads, want_grads, names, TOL["fp32"], (algo, layer, path, training))
    # the control: without bypass_mode, forward_path=fold does not call the layer's forward at all
    plain = build(case(algo=algo, layer=layer), "fold")
    mode = QuantisedBase(plain.layer)
    with mode, torch.no_grad():
        plain.layer(x)
    assert mode.calls == 0


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("algo", ALGOS)
def test_dora_rank_dropout_keeps_its_rescale(algo, axis):
    """DoRA with rank_dropout: one subset of rank components per call, kept ones scaled by 1/(1-p), in
    the weight before the norm: every call's output and gradients are the closed form of one subset."""
    c = case(algo=algo, layer="lin", dora=axis, rank_dropout=0.4)
    builds = {path: build(c, path) for path in PATHS}
    shape = LAYERS[c.layer][1]
    probe_one = torch.randn((1, *shape[1:-1], 24), generator=torch.Generator().manual_seed(6))
    dropout_checks(c, builds, shape, probe_one)


def save_network(c, path, alpha, seed, file):
    """A trained-looking network of the case with this alpha, saved; returns the file's tensors."""
    unet = ToyUNet(c.layer)
    net = lycoris_kohya.create_network(1.0, RANK, alpha, None, [], unet, **network_args(c, path))
    a, t = held(net)
    set_values(c, a, t, seed)
    net.save_weights(file, torch.float32, {})
    return load_file(file)


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_with_another_alpha_trains_with_the_files_alpha(algo, tmp_path):
    """--network_weights with a different --network_alpha: the file's alpha is the scale of the resumed
    network, in its forward (eval and train), its gradients, max-norm and the file it saves again;
    and create_network_from_weights computes the same."""
    c = case(algo=algo, layer="lin")
    file_alpha, cli_alpha = 6.0, 1.0
    file = str(tmp_path / "a.safetensors")
    sd = save_network(c, "auto", file_alpha, 3, file)
    name = "lora_unet_block_layer"
    assert float(sd[f"{name}.alpha"]) == file_alpha
    w0 = ToyUNet(c.layer).block.layer.weight.detach()
    g_file, dw = reference_delta(sd, name, w0.shape)  # the closed form of the file: g = its alpha / r
    assert g_file == file_alpha / RANK
    x = inputs(c)

    resumed_unet, loaded_unet = ToyUNet(c.layer), ToyUNet(c.layer)
    resumed = lycoris_kohya.create_network(1.0, RANK, cli_alpha, None, [], resumed_unet,
                                           **network_args(c, "structured"))
    resumed.load_weights(file)
    from_file, _ = lycoris_kohya.create_network_from_weights(1.0, file, None, [], loaded_unet)
    for net, unet in ((resumed, resumed_unet), (from_file, loaded_unet)):
        net.apply_to([], unet, True, True)
        a, t = held(net)
        layer = a.layer
        want = op(layer, x, w0 + g_file * dw)
        for training in (False, True):
            net.train(training)
            with torch.no_grad():
                assert rel(layer(x), want) < TOL["fp32"]["out"], (training, rel(layer(x), want))
        # the gradients scale with the file's alpha too
        names = trainable(t)
        ref = fp32_copies(t)

        def closed(x):
            _, d = reference_delta({f"m.{k}": ref[k] for k in factor_keys(ref)}, "m", w0.shape)
            return op(layer, x, w0 + g_file * d)

        _, want_grads = with_grads(closed, x, [ref[k] for k in names], probe_for(a, x))
        _, grads = with_grads(layer, x, [t[k] for k in names], probe_for(a, x))
        assert_grads(grads, want_grads, names, TOL["fp32"], algo)
        _, _, top = net.apply_max_norm_regularization(1e9, "cpu")  # ||g*dW|| with the file's g
        assert top == pytest.approx(float((g_file * dw).norm()), rel=1e-5)
    resumed.save_weights(str(tmp_path / "b.safetensors"), torch.float32, {})
    again = load_file(str(tmp_path / "b.safetensors"))
    assert float(again[f"{name}.alpha"]) == file_alpha
    assert reference_delta(again, name, w0.shape)[0] == g_file


def dora_over(c, w0, t, layer):
    return closed_form_weight(c, fp32_copies(t), layer, w0=w0)


# data_add: a change through .data bumps no version counter (the reason DoRA keeps no ||W0||^2 cache)
IN_PLACE = ["merge_to", "pre_calculation", "no_grad_add", "data_add"]


@pytest.mark.parametrize("change", IN_PLACE)
@pytest.mark.parametrize("algo", ALGOS)
def test_dora_follows_an_in_place_change_of_w0(algo, change):
    """DoRA takes ||W0 + g*dW|| of the weight the layer holds now: after another network merges into it
    (merge_to, or gen_img's pre_calculation of a network applied over ours) or any in-place change, the
    forward is the closed form over the new W0, not over the W0 of an earlier call."""
    c = case(algo=algo, layer="lin", dora="input")
    b = build(c, "structured")
    b.net.eval()
    x = inputs(c)
    layer = b.layer
    with torch.no_grad():
        assert rel(layer(x), op(layer, x, dora_over(c, layer.weight.detach().float(), b.t, layer))) < 1e-6
        unet = ToyUNet(c.layer)  # a model object whose block.layer is ours, for the other network
        unet.block.layer = layer
        other = lycoris_kohya.create_network(0.8, RANK, ALPHA, None, [], unet, algo="locon")
        oa, ot = held(other)
        gen = torch.Generator().manual_seed(9)
        for k in factor_keys(ot):
            ot[k].copy_(torch.randn(ot[k].shape, generator=gen) * 0.2)
        before = layer.weight.detach().clone()
        if change == "merge_to":
            other.merge_to([], unet, None, torch.float32, "cpu")
        elif change == "pre_calculation":
            other.apply_to([], unet, True, True)  # over ours, as gen_img applies networks in order
            other.pre_calculation()
        elif change == "no_grad_add":
            layer.weight.add_(0.3 * torch.randn(layer.weight.shape, generator=gen))
        else:
            layer.weight.data.add_(0.3 * torch.randn(layer.weight.shape, generator=gen))
        w_now = layer.weight.detach().float()
        assert rel(w_now, before) > 0.05
        if change in ("merge_to", "pre_calculation"):  # the other network's closed form, merged
            assert rel(w_now, before + 0.8 * (ALPHA / RANK) * reference_delta(
                {f"m.{k}": v for k, v in ot.items() if k != "alpha"}, "m", before.shape)[1]) < 1e-6
        got, want = layer(x), op(layer, x, dora_over(c, w_now, b.t, layer))
        assert rel(got, want) < 1e-5, rel(got, want)


@pytest.mark.parametrize("dora", ["none", "input", "output"])
def test_loha_few_token_path_under_autocast_gives_the_layers_dtype(dora):
    c = case(algo="loha", layer="lin_odd", dora=dora, dtype="autocast")
    b = build(c, "structured")
    x = inputs(c)  # 3 tokens, rank 4
    with torch.no_grad():
        y = run(c, b.layer, x)
        with torch.autocast("cpu", dtype=BF16):
            assert F.linear(x, b.layer.weight, b.layer.bias).dtype == BF16
    assert rel(y, expected_output(c, b.layer, fp32_copies(b.t), x)) < TOL["autocast"]["out"]  # right values
    assert y.dtype == BF16, y.dtype


# ----- block-wise learning rates, as kohya's networks.lora computes them -----------------------------
def kohya_lr_weight(is_sdxl, down, mid, up, zero_threshold=0.0):
    """sd-scripts networks/lora.py get_block_lr_weight, restated: the curves over the n down/up blocks
    (n = 12, SDXL 9), missing entries 1, then (w if w > zero_threshold else 0); SDXL adds 1.0 for the
    embeddings (block 0) and the output (block 22)."""
    n, n_mid = (9, 3) if is_sdxl else (12, 1)

    def get_list(spec):
        name, _, base = spec.partition("+")
        base_lr = float(base) if base else 0.0
        if name == "cosine":
            return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in reversed(range(n))]
        if name == "sine":
            return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in range(n)]
        if name == "linear":
            return [i / (n - 1) + base_lr for i in range(n)]
        if name == "reverse_linear":
            return [i / (n - 1) + base_lr for i in reversed(range(n))]
        if name == "zeros":
            return [0.0 + base_lr] * n
        raise ValueError(spec)

    def fit(v, length):
        if v is None:
            return [1.0] * length
        v = get_list(v) if isinstance(v, str) else list(v)
        v = v + [1.0] * (length - len(v))
        return [w if w > zero_threshold else 0 for w in v]  # (kohya thresholds the lists given only)

    weights = fit(down, n) + fit(mid, n_mid) + fit(up, n)
    return [1.0] + weights + [1.0] if is_sdxl else weights


def kohya_block_index(name, is_sdxl):
    """sd-scripts networks/lora.py get_block_index, restated."""
    import re

    if not is_sdxl:
        m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", name)
        if m:
            kind, i, sub, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if sub in ("upsamplers", "downsamplers") else j)
            return 1 + idx if kind == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in name else -1
    rest = name[len("lora_unet_"):]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return base + int(rest.split("_")[2])
    return 22 if rest.startswith("out_") else -1


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(4, 4)


Transformer2DBlock = type("Transformer2DModel", (_Attn,), {})  # the class name the default preset adapts


def _blocks(n, **children):
    out = nn.ModuleList()
    for i in range(n):
        m = nn.Module()
        for child, count in children.items():
            k = count(i) if callable(count) else count
            if k:
                setattr(m, child, nn.ModuleList([Transformer2DBlock() for _ in range(k)]))
        out.append(m)
    return out


class SD1Blocks(nn.Module):
    """Every SD1 block kohya numbers: down i (attentions 0-1, downsamplers but in the last), mid, up i
    (attentions 0-2, upsamplers but in the last)."""

    def __init__(self):
        super().__init__()
        self.down_blocks = _blocks(4, attentions=2, downsamplers=lambda i: 1 if i < 3 else 0)
        self.mid_block = _blocks(1, attentions=1)[0]
        self.up_blocks = _blocks(4, attentions=3, upsamplers=lambda i: 1 if i < 3 else 0)


class SDXLBlocks(nn.Module):
    """sd-scripts' SDXL U-Net paths: time_embed, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out."""

    def __init__(self):
        super().__init__()
        self.time_embed = Transformer2DBlock()
        self.input_blocks = nn.ModuleList([nn.ModuleList([Transformer2DBlock()]) for _ in range(9)])
        self.middle_block = nn.ModuleList([Transformer2DBlock() for _ in range(3)])
        self.output_blocks = nn.ModuleList([nn.ModuleList([Transformer2DBlock()]) for _ in range(9)])
        self.out = Transformer2DBlock()


LR_CURVES = [
    dict(down_lr_weight="cosine", up_lr_weight="sine"),
    dict(down_lr_weight="sine", up_lr_weight="cosine", mid_lr_weight="0.5"),
    dict(down_lr_weight="linear", up_lr_weight="reverse_linear+0.1"),
    dict(down_lr_weight="reverse_linear", up_lr_weight="zeros+0.25", block_lr_zero_threshold="0.3"),
    dict(down_lr_weight="sine+0.2", mid_lr_weight="2", block_lr_zero_threshold="0.25"),
    dict(up_lr_weight="0.5,0,1.5"),
]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("args", LR_CURVES, ids=lambda a: "+".join(f"{k.split('_')[0]}={v}" for k, v in a.items()))
def test_block_lr_weight_curves_are_kohyas(args, sdxl):
    """down/mid/up_lr_weight (curves, offsets, lists, the zero threshold): every U-Net parameter's group
    has lr = unet_lr * kohya's weight of its block, and blocks of weight 0 have no modules."""
    unet = SDXLBlocks() if sdxl else SD1Blocks()
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, [], unet, **args)
    def kohya_arg(key):  # kohya's parse_block_lr_kwargs: a curve name, or a list of numbers
        v = args.get(key)
        try:
            return None if v is None else [float(w) for w in v.split(",")]
        except ValueError:
            return v

    weights = kohya_lr_weight(sdxl, kohya_arg("down_lr_weight"), kohya_arg("mid_lr_weight"), kohya_arg("up_lr_weight"),
                              float(args.get("block_lr_zero_threshold", 0.0)))
    names = {id(p): a.lora_name for a in net.loras for p in a.parameters()}
    blocks_present = {kohya_block_index(a.lora_name, sdxl) for a in net.loras}
    every = {kohya_block_index(f"lora_unet_{p.replace('.', '_')}", sdxl) for p, m in unet.named_modules()
             if isinstance(m, nn.Linear)}
    assert blocks_present == {i for i in every if weights[i] != 0}, sorted(every - blocks_present)
    groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-4)
    seen = set()
    for group in groups:
        for p in group["params"]:
            idx = kohya_block_index(names[id(p)], sdxl)
            assert group["lr"] == pytest.approx(1e-3 * weights[idx], rel=1e-9), (names[id(p)], idx, group["lr"])
            seen.add(id(p))
    assert seen == set(names)


# ----- the pipeline: merged files unmerged in any order ---------------------------------------------
class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = Transformer2DModel(nn.Linear(16, 24))
        self.block.l2, self.block.l3 = nn.Linear(16, 24), nn.Conv2d(16, 24, 3, padding=1)
        self.requires_grad_(False)


FILES = {  # each pair of files shares one layer; C is DoRA, so the order of merging matters
    "A": ({"algo": "locon"}, ("layer", "l2"), 0.7),
    "B": ({"algo": "loha"}, ("l2", "l3"), 0.5),
    "C": ({"algo": "lokr", "factor": "2", "dora_wd": "true"}, ("l3", "layer"), 0.9),
}


def pipeline_files(tmp_path):
    """{file: (path, its tensors, multiplier)}: networks over the three layers, each file keeping two."""
    out = {}
    for i, (key, (args, layers, m)) in enumerate(FILES.items()):
        unet = ThreeLayers()
        net = lycoris_kohya.create_network(1.0, RANK, ALPHA, None, [], unet, **args)
        gen = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for k, p in net.named_parameters():
                if not k.endswith("dora_scale"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                else:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
        sd = {k: v.detach().clone() for k, v in net.export_state_dict().items()
              if k.split(".")[0].rsplit("_", 1)[1] in layers}
        path = str(tmp_path / f"{key}.safetensors")
        save_file(sd, path)
        out[key] = (path, sd, m)
    return out


def merged_in_order(model, files, order):
    """The weights after merging ``order`` (file keys) from the closed form (SPEC section 3)."""
    w = {n: getattr(model.block, n).weight.detach().clone() for n in ("layer", "l2", "l3")}
    for key in order:
        _, sd, m = files[key]
        for n in w:
            name = f"lora_unet_block_{n}"
            if f"{name}.alpha" not in sd:
                continue
            g, dw = reference_delta(sd, name, w[n].shape)
            if f"{name}.dora_scale" in sd:
                v = w[n] + g * dw
                w[n] = w[n] + m * (v * sd[f"{name}.dora_scale"] / column_norm(v) - w[n])
            else:
                w[n] = w[n] + m * g * dw
    return w


@pytest.mark.parametrize("unmerge", ["ABC", "BCA", "CBA", "ACB", "BAC"])
def test_pipeline_unmerges_in_any_order_and_restores_exactly(unmerge, tmp_path):
    """LycorisAdapters with three files over overlapping layers, merged A, B, C: unmerging one redoes
    the files merged after it on the weights without it, so after each unmerge the weights are the
    closed form of the others merged in their order, and after the last they are W0, bit for bit."""
    files = pipeline_files(tmp_path)
    model = ThreeLayers()
    w0 = {n: getattr(model.block, n).weight.detach().clone() for n in ("layer", "l2", "l3")}
    pipe = SimpleNamespace(unet=model, text_encoder=None)
    lyco = LycorisAdapters(pipe)
    handles = {k: lyco.load(path, m) for k, (path, _, m) in files.items()}
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hooked = model.block.layer(x)
    for k in "ABC":
        handles[k].merge()
    merged = ["A", "B", "C"]
    want = merged_in_order(model.__class__(), files, merged)
    for n, w in want.items():
        assert rel(getattr(model.block, n).weight, w) < 1e-5, n
    with torch.no_grad():  # merged files pass through: the same output as hooked
        assert rel(model.block.layer(x), hooked) < 1e-5
    for k in unmerge:
        handles[k].unmerge()
        merged.remove(k)
        want = merged_in_order(model.__class__(), files, merged)
        for n, w in want.items():
            assert rel(getattr(model.block, n).weight, w) < 1e-5, (unmerge, k, n)
    for n, w in w0.items():
        assert torch.equal(getattr(model.block, n).weight, w), n
    lyco.remove_all()
    assert all("forward" not in m.__dict__ for m in model.modules())
