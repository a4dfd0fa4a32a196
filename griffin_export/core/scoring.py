"""Pure tensor math of GRIFFIN selection: the statistic, k, and top-k. No hooks, no I/O.

For one FF layer and prompt tokens t = 1..T with down-projection inputs z_t in R^{d_ff}:

    z~_t = z_t / ||z_t||_2          (per token; a zero vector stays zero)
    s_j  = sqrt(sum_t z~_tj^2)      (so sum_j s_j^2 = number of non-zero tokens)

The statistic is computed in float32 whatever the model's dtype. Because it is a sum over
tokens, it can be accumulated prompt by prompt (or chunk by chunk) as ``sum_t z~_tj^2``
(:func:`normalized_square_sum`) and finished with a square root (:func:`griffin_statistic`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from griffin_export.errors import UsageError

STATISTIC_NAME = "l2-over-tokens-of-l2-normalised-down-proj-inputs"


def normalized_squares(z: Tensor) -> Tensor:
    """``(z_t / ||z_t||)^2`` per token and neuron, in float32: each token's share of its own
    activation energy.

    Args:
        z: ``[..., d_ff]`` down-projection inputs; all leading axes are tokens.

    Returns:
        ``[T, d_ff]`` float32. A token whose activation vector is all zero gives a zero row.
    """
    z = z.reshape(-1, z.shape[-1]).float()  # [T, d_ff]
    norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)  # [T, 1]
    unit = z / norms.clamp_min(torch.finfo(torch.float32).tiny)
    return unit.square()


def normalized_square_sum(z: Tensor) -> Tensor:
    """``sum_t (z_t / ||z_t||)^2`` per neuron, in float32 (:func:`normalized_squares` summed
    over tokens): ``[..., d_ff]`` -> ``[d_ff]``."""
    return normalized_squares(z).sum(dim=0)


def griffin_statistic(z_or_sums: Tensor, *, accumulated: bool = False) -> Tensor:
    """The GRIFFIN neuron score ``s`` (``[d_ff]``, float32).

    Pass the raw activations ``[..., d_ff]``, or with ``accumulated=True`` the output of
    :func:`normalized_square_sum` summed over any number of token chunks.
    """
    sums = z_or_sums.float() if accumulated else normalized_square_sum(z_or_sums)
    return sums.sqrt()


def keep_count(d_ff: int, ratio: float, multiple_of: int = 1) -> int:
    """Number of neurons kept: ``ratio * d_ff`` rounded to a multiple of ``multiple_of``.

    The result is at least one multiple (or ``d_ff`` if that is smaller) and never above
    ``d_ff``; ``ratio == 1`` keeps all ``d_ff`` neurons even when ``d_ff`` is not a multiple.
    """
    check_ratio(ratio)
    check_multiple_of(multiple_of)
    if ratio >= 1.0:
        return d_ff
    if multiple_of > d_ff:
        return d_ff
    k = round(ratio * d_ff / multiple_of) * multiple_of
    largest = (d_ff // multiple_of) * multiple_of
    return int(min(max(k, multiple_of), largest))


def check_multiple_of(multiple_of: int) -> None:
    """Reject a ``multiple_of`` that is not a positive integer, naming the fix."""
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1:
        raise UsageError(
            f"--multiple-of must be a positive integer, got {multiple_of!r}; use e.g. 1, 64 or 128"
        )


def check_sizes(k_per_layer: Sequence[int], n_layers: int, d_ff: int) -> list[int]:
    """``k_per_layer`` as a list, if it gives every one of ``n_layers`` layers a width in
    ``1..d_ff``; else ``UsageError`` naming the fix."""
    ks = [int(k) for k in k_per_layer]
    if len(ks) != n_layers or not all(1 <= k <= d_ff for k in ks):
        raise UsageError(
            f"k_per_layer {ks} must give {n_layers} sizes in 1..{d_ff}; use "
            "griffin_export.core.budgets.layer_sizes"
        )
    return ks


def check_ratio(ratio: float, option: str = "--ratio") -> None:
    """Reject ratios outside (0, 1] (and NaN) with a message naming the fix; ``option`` is
    the option that gave it (``--experts`` keeps routed experts, not neurons)."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        what = "of every FF layer" if option == "--ratio" else "of the routed experts per layer"
        raise UsageError(
            f"{option} must be a fraction in (0, 1], got {ratio!r}; e.g. {option} 0.5 keeps "
            f"half {what}"
        )


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ties broken by lower index, sorted ascending.

    Deterministic: the same scores always give the same indices (int64, ``[k]``).
    """
    try:
        count = operator.index(k)  # ints of any kind (Python, NumPy, 0-d tensors), no floats
    except TypeError:
        count = 0
    if not 0 < count <= scores.numel():
        raise UsageError(
            f"top_k_indices: k={k!r} is not an integer in 1..{scores.numel()} (the number of "
            "scores); pass a k in that range"
        )
    # A stable descending sort keeps equal scores in index order, so lower indices win ties.
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def jaccard(a: Tensor, b: Tensor) -> float:
    """Jaccard overlap of two index sets (1.0 when both are empty)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union
