"""Which forward path a call takes: ``fold`` (one op with the merged weight W0 + m*g*dW) or
``structured`` (the layer's own forward plus the adapter's factored map, no dense dW).

``forward_path`` chooses: ``structured`` always; ``fold`` wherever folding is possible; ``auto`` the
cheaper of the two by multiply-add counts on this call's shapes. Folding is possible only over the
plain layer (nothing else hooks it), with no extra forward arguments, and without a per-sample
training dropout (dropout, or rank_dropout outside DoRA, draws per sample: no one weight has that
effect). ``bypass_mode`` (quantised bases) never folds.
"""
from __future__ import annotations

from .geometry import LayerGeometry

FORWARD_PATHS = ("auto", "fold", "structured")


def check(forward_path: str) -> str:
    if forward_path not in FORWARD_PATHS:
        raise ValueError(f"forward_path={forward_path!r}; accepted: {', '.join(FORWARD_PATHS)}")
    return forward_path


def fold_is_cheaper(g: LayerGeometry, per: int, build: int, tokens: int, dora: bool, grad: bool) -> bool:
    """The cost model. ``per``: multiply-adds per output position of the structured map; ``build``:
    multiply-adds to build dW; ``tokens``: output positions of this call. With DoRA the norms (by
    factor identities, about one build) and the input/output rescaling count too. With a gradient,
    folding builds the weight forward and again in backward and adds a dense weight gradient; the
    structured path runs its map three times (forward, and backward for input and factors)."""
    dense = g.out_dim * g.in_dim * g.kernel_area
    if dora:
        build, per = build + 2 * dense, per + g.in_dim
    if grad:
        return 3 * build + tokens * dense < 3 * tokens * (per + g.out_dim)
    return build + dense < tokens * (per + g.out_dim)
