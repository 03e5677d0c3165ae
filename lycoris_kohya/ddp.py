"""Several processes training one network (DDP as sd-scripts and musubi-tuner run it).

Both trainers average gradients by hand after backward, one collective per parameter that has a
gradient (musubi-tuner: ``for param in network.parameters(): if param.grad is not None:
accelerator.reduce(...)``). ``module_dropout`` skips whole modules, and a skipped module's
parameters have no gradient, so every process must skip the same modules, or the collectives pair
different tensors (a crash on a size mismatch, a hang, or silently averaging the wrong tensors). The
decisions are drawn from torch's global generator, so they agree exactly when the processes'
generators do: which they do when the trainer seeds every process alike (``--seed``), and do not
when it draws a seed per process (musubi-tuner and sd-scripts without ``--seed``).
"""
from __future__ import annotations

import hashlib

import torch


def world_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def check_generators_agree() -> None:
    """Raise on every process if the processes' global generators differ (one all-reduce of a
    digest of the generator state); nothing with one process."""
    import torch.distributed as dist

    n = world_size()
    if n < 2:
        return
    digest = int(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:15], 16)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    if both[0].item() != digest or -both[1].item() != digest:
        raise RuntimeError(
            f"lycoris_kohya: module_dropout with {n} processes needs every process to skip the same modules, "
            "but their random generators differ (the trainer seeded each process with its own random seed: "
            "musubi-tuner and sd-scripts do when --seed is not given), so their gradients cannot be averaged. "
            "Pass --seed, or leave module_dropout out.")
