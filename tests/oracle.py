"""Independent references for the tests: the formulas of SPEC section 3 written out here, never
taken from the package. Every test that checks numbers compares against these."""
import torch
import torch.nn.functional as F
from torch import nn


def cp(t, a, b):
    """W[o,i,h,w] = sum_pq t[p,q,h,w] a[p,o] b[q,i], written as loops over the core."""
    r1, r2, kh, kw = t.shape
    out = torch.zeros(a.shape[1], b.shape[1], kh, kw)
    for p in range(r1):
        for q in range(r2):
            out += torch.outer(a[p], b[q])[:, :, None, None] * t[p, q]
    return out


_KEYS = {}  # the last state dict seen, its key set, and its keys by module name


def _module_keys(sd, name):
    """The keys of ``sd`` that start with ``name + "."``. Callers ask once per module of the same
    file: the keys are grouped once per state dict (checked against its current key set on every
    call, so a dict that gained or lost keys is grouped again) instead of scanned per module."""
    if "." in name:
        return [k for k in sd if k.startswith(name + ".")]
    if _KEYS.get("sd") is not sd or _KEYS["keys"] != sd.keys():
        groups = {}
        for k in sd:
            head, dot, _ = k.partition(".")
            if dot:
                groups.setdefault(head, []).append(k)
        _KEYS.update(sd=sd, keys=set(sd), groups=groups)
    return _KEYS["groups"].get(name, [])


def reference_delta(sd, name, shape):
    """(g, dW) from the stored tensors of one module."""
    t = {k[len(name) + 1:]: sd[k].float() for k in _module_keys(sd, name)}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_down.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in t:
            dw = cp(t["lora_mid.weight"], up.flatten(1).T, down.flatten(1))
        else:
            dw = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    elif "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            dw = cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            dw = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
    else:
        r = None
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w1_b" in t:
            r = t["lokr_w1_b"].shape[0]
        a, c = w1.shape
        b, d = shape[0] // a, shape[1] // c
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            r = t["lokr_w2_b"].shape[0]
        else:
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b, d, *shape[2:])
            r = t["lokr_w2_b"].shape[0]
        w2 = w2.reshape(b, d, -1)
        # kron written out: dW[i*b+j, k*d+l] = w1[i,k] * w2[j,l]
        dw = torch.einsum("ik,jls->ijkls", w1, w2).reshape(a * b, c * d, *shape[2:])
    g = 1.0 if (alpha is None or r is None) else alpha / r
    return g, dw.reshape(shape)


def apply_layer(layer, w, x):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    return F.linear(x, w, layer.bias)



# ----- DoRA (SPEC section 3) ---------------------------------------------------------------------
def column_norm(w):
    """||.|| per input column: over the output and kernel dims -> [1, in, (1, 1)]."""
    per_in = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return per_in.reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def row_norm(w):
    """||.|| per output row -> [out, 1, (1, 1)]."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))


def trained_weight(w0, g, dw, scale, m, axis):
    v = w0 + g * dw
    n = column_norm(v) if axis == "input" else row_norm(v)
    return w0 + m * (v * scale / n - w0)


# clean-room re-statements of what the UIs compute from a file (SPEC section 3, not their code)
def comfyui_weight(w0, g, dw, scale, m):
    v = w0 + g * dw
    if scale.shape[0] == 1:  # input axis: norm of V per input column
        wd = v * (scale / column_norm(v))
    else:  # output axis: ComfyUI divides by ||W0|| instead of ||V||
        wd = v * (scale / row_norm(w0))
    return w0 + m * (wd - w0)


def a1111_weight(w0, g, dw, scale, m):
    v = w0 + g * dw
    assert scale.shape[0] == 1, "A1111 only implements the input axis"
    return w0 + m * (v * scale / column_norm(v) - w0)




def adapter_sd(adapter):
    """An adapter's live tensors (parameters, so references stay differentiable) under file keys;
    a use_scalar scalar is folded into its zero-initialised tensor as files store it."""
    sd = {f"{adapter.lora_name}.{k}": v for k, v in adapter.tensors().items()}
    if adapter.scalar is not None:
        key = f"{adapter.lora_name}.{adapter.zero_init}"
        sd[key] = sd[key] * adapter.scalar
    sd[f"{adapter.lora_name}.alpha"] = adapter.alpha
    return sd


# musubi-tuner's inference merge (utils/lora_utils.py load_safetensors_with_lora_and_fp8, with
# networks/loha.py and networks/lokr.py merge_weights_to_tensor), re-stated from reading it
def musubi_file_type(lora_sd):
    """detect_network_type: the first key (sorted, as safetensors lists them) naming a type."""
    for key in sorted(lora_sd):
        for kind, fragment in (("lora", "lora_down"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1")):
            if fragment in key:
                return kind
    return "lora"


def musubi_merge(weights, lora_sd, m):
    """(the model's weights with the file merged at multiplier m, the file's keys it did not use);
    Linear layers (what musubi's families adapt)."""
    kind = musubi_file_type(lora_sd)
    unused = set(lora_sd)
    out = {}
    for key, w in weights.items():
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        t = {k[len(name) + 1:]: lora_sd[k].float() for k in lora_sd if k.startswith(name + ".")}
        used = []
        if kind == "lora" and "lora_down.weight" in t and "lora_up.weight" in t:
            r = t["lora_down.weight"].shape[0]
            scale = float(t.get("alpha", r)) / r
            w = w + m * (t["lora_up.weight"] @ t["lora_down.weight"]) * scale
            used = ["lora_down.weight", "lora_up.weight", "alpha"]
        elif kind == "loha" and "hada_w1_a" in t:
            r = t["hada_w1_b"].shape[0]
            scale = float(t.get("alpha", r)) / r
            w = w + m * ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * scale
            used = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]
        elif kind == "lokr" and "lokr_w1" in t and ("lokr_w2_a" in t or "lokr_w2" in t):
            if "lokr_w2_a" in t:
                r = t["lokr_w2_a"].shape[1]
                scale = float(t.get("alpha", r)) / r
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
                used = ["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"]
            else:
                scale, w2 = 1.0, t["lokr_w2"]
                used = ["lokr_w1", "lokr_w2", "alpha"]
            w = w + m * torch.kron(t["lokr_w1"], w2) * scale
        unused -= {f"{name}.{k}" for k in used}
        out[key] = w
    return out, unused
