"""What runs inside musubi-tuner's venv (musubi's ``src`` on PYTHONPATH), one subcommand a process:

  inside.py build  --family wan --work DIR            build the family's models and dataset; prints JSON paths
  inside.py run    --family wan -m MODULE -- ARGS...  run one of musubi's scripts as ``python -m MODULE ARGS``
  inside.py reload --family wan --dit DIT --file F    reload a saved network onto the DiT; prints JSON

``run`` changes nothing in musubi: before the script is imported it makes ``torch.cuda.current_device``
answer on a machine without CUDA (musubi's Wan T5 module evaluates it as a default argument at import)
and ``torch.cuda.set_device`` a no-op there (block swap's thread calls it for the CPU device too),
lets a CUDA-linked torchvision wheel import beside the CPU torch (see _tolerate_cuda_torchvision), and
lets the family register its micro sizes (<family>_micro.install). Then the module runs as __main__.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = {"wan": "wan_micro", "zimage": "zimage_micro"}


def family_module(name: str):
    sys.path.insert(0, HERE)
    return importlib.import_module(FAMILIES[name])


def patch_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0  # only ever a default argument; the scripts get --device cpu
        # musubi's block swap thread calls torch.cuda.set_device(dev) for any device
        # (modules/custom_offloading_utils.py, move_blocks); with the CPU device there is nothing to select
        torch.cuda.set_device = lambda device: None
    _tolerate_cuda_torchvision()


def _tolerate_cuda_torchvision() -> None:
    """PyPI's torchvision wheel is linked against CUDA: with the CPU torch its _C cannot load, and
    ``import torchvision`` then dies registering fake kernels for ops that do not exist (torchvision::nms).
    musubi only uses torchvision's Python transforms, so a torchvision:: registration that fails is skipped."""
    import torch.library as lib

    real = lib.register_fake
    if getattr(real, "_lk_tolerant", False):
        return

    def register_fake(op, *args, **kwargs):
        out = real(op, *args, **kwargs)
        if args or not (isinstance(op, str) and op.startswith("torchvision::")):
            return out

        def decorate(fn):
            try:
                return out(fn)
            except RuntimeError:  # "operator torchvision::nms does not exist": _C did not load
                return fn
        return decorate

    register_fake._lk_tolerant = True
    lib.register_fake = register_fake


def cmd_build(a) -> None:
    patch_cuda()
    paths = family_module(a.family).build(a.work, a.size)
    print("RESULT " + json.dumps(paths))


def cmd_run(a, rest) -> None:
    patch_cuda()
    family_module(a.family).install(a.size)
    sys.argv = [a.module, *rest]
    runpy.run_module(a.module, run_name="__main__", alter_sys=True)


def cmd_reload(a) -> None:
    """The saved file, read back: the module count lycoris_kohya rebuilds from it on the DiT musubi loads,
    the count musubi's own LoRA for the family makes there, and whether the modules are the same layers."""
    patch_cuda()
    import torch
    from safetensors import safe_open
    import lycoris_kohya

    fam = family_module(a.family)
    dit = fam.load_dit(a.dit, a.size)
    with safe_open(a.file, "pt") as f:
        meta = f.metadata() or {}
        names = sorted({k.split(".", 1)[0] for k in f.keys()})
    out = {"file_modules": len(names), "ss_network_module": meta.get("ss_network_module"),
           "ss_network_args": meta.get("ss_network_args")}
    try:
        net = lycoris_kohya.create_arch_network_from_weights(1.0, a.file, unet=dit)
        out["reloaded_modules"] = len(net.unet_loras)
        out["reloaded_names_equal_file"] = sorted(m.lora_name for m in net.unet_loras) == names
        net.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
        out["reload_ok"] = True
    except Exception as e:  # reported, not raised: the runner tabulates it
        out["reload_ok"] = False
        out["reload_error"] = f"{type(e).__name__}: {e}"
    try:
        own = importlib.import_module(fam.MUSUBI_LORA)
        theirs = own.create_arch_network(1.0, 4, 1, None, None, dit)
        out["musubi_lora_modules"] = len(theirs.unet_loras)
        out["musubi_lora_names_equal_file"] = sorted(m.lora_name for m in theirs.unet_loras) == names
    except Exception as e:
        out["musubi_lora_error"] = f"{type(e).__name__}: {e}"
    del torch
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build", "run", "reload"):
        s = sub.add_parser(name)
        s.add_argument("--family", required=True, choices=sorted(FAMILIES))
        s.add_argument("--size", default="micro")
        if name == "build":
            s.add_argument("--work", required=True)
        if name == "run":
            s.add_argument("-m", dest="module", required=True)
        if name == "reload":
            s.add_argument("--dit", required=True)
            s.add_argument("--file", required=True)
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    if a.cmd == "run":
        cmd_run(a, rest)
    else:
        {"build": cmd_build, "reload": cmd_reload}[a.cmd](a)


if __name__ == "__main__":
    main()
