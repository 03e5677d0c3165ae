"""DoRA's norm ||W0 + g*dW|| (dora_norms.pair_scale / kron_scale) three ways on real layer shapes (SD1.5,
Flux): the hand-written backward, plain autograd of the same forward, and plain autograd under
checkpoint; milliseconds per forward+backward and the bytes autograd saves for backward (W itself
counted: it is the layer's own tensor when it is in the factors' dtype, an extra copy when not).

    python scripts/bench_dora_norms.py"""
import os
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lycoris_kohya.algos import dora_norms as dn  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)


def saved_bytes(fn):
    total = [0]
    seen = set()
    def pack(t):
        key = (t.data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key); total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def variants(kind, w, axis, g=0.5):
    rows, cols = w.shape
    R = 8
    if kind == "pair":
        p = torch.randn(R, rows, requires_grad=True); q = torch.randn(R, cols, requires_grad=True)
        mag = torch.rand(cols if axis == "input" else rows) + 1
        w_sq = dn.weight_sq(w, axis).flatten()
        def hand(): return dn.pair_scale(p, q, w, w_sq, mag, axis, g)
        def plain():
            pp, qq, ww = (q, p, w.T) if axis == "output" else (p, q, w)
            return mag / dn._pair_norm(pp, qq, ww, w_sq, g)[0]
        params = (p, q)
    else:
        a, b = 16, rows // 16; c, dk = 16, cols // 16
        w1 = torch.randn(a, c, requires_grad=True); w2 = torch.randn(b, dk, requires_grad=True)
        mag = torch.rand(cols if axis == "input" else rows) + 1
        w_sq = dn.weight_sq(w, axis).flatten()
        def hand(): return dn.kron_scale(w1, w2, w, w_sq, mag, axis, g)
        def plain(): return mag / dn._kron_norm(w1, w2, w, w_sq, g, axis)[0]
        params = (w1, w2)
    def ckpt(): return checkpoint(plain, use_reentrant=False)
    return {"hand": hand, "plain": plain, "plain+ckpt": ckpt}, params


def timeit(fn, params, n):
    def step():
        s = fn(); s.sum().backward()
        for p in params: p.grad = None
    step()
    t = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - t) / n * 1e3


for dtype in (torch.float32, torch.bfloat16):
    for (rows, cols, label) in [(1280, 1280, "sd15 attn 1280"), (320, 2880, "sd15 conv 320x3x3"),
                                (5120, 1280, "sd15 ff 1280->5120"), (3072, 3072, "flux attn 3072"),
                                (12288, 3072, "flux mlp 3072->12288")]:
        w = (torch.randn(rows, cols) * 0.02).to(dtype)
        for kind in ("pair", "kron"):
            for axis in ("input", "output"):
                vs, params = variants(kind, w, axis)
                ref = vs["hand"]().detach()
                res = []
                for name, fn in vs.items():
                    out, nbytes = saved_bytes(fn)
                    assert torch.allclose(out.detach(), ref, rtol=1e-4), name
                    res.append((name, timeit(fn, params, 5 if rows * cols > 4e6 else 15), nbytes / 2**20))
                h = res[0][1]
                print(f"{label:22s} {str(dtype)[6:]:8s} {kind:4s} {axis:6s} " + "  ".join(
                    f"{n} {t:7.2f} ms ({t / h:4.2f}x) saved {mb:6.2f} MiB" for n, t, mb in res), flush=True)
