"""Per-layer budget allocations measured by ``benchmarks/ablation_budgets.py`` and not offered
by ``--budget`` (they need every layer's statistic before the first layer is written, which the
streaming export cannot wait for, and none beat ``protect``: ``benchmarks/RESULTS-budgets.md``).

``griffin_export.core.budgets`` keeps what the CLI offers (``uniform``, ``protect``); this module
spends the same total ``K = n_layers * k`` from per-layer *gain* vectors: ``g_l[i]`` is what
layer ``l`` gains by keeping its ``i``-th neuron in selection order (the order of the GRIFFIN
statistic ``s_l``, largest first). Everything is training- and calibration-free: the gains come
from the prompt's own activations (and, for ``output``, the model's weights). Methods
(:data:`METHODS`; ``greedy`` is ``energy``'s allocation on any gains):

* ``uniform`` -- GRIFFIN: ``k_l = k`` for every layer (bit-for-bit the uniform export).
* ``energy`` -- maximise the total captured normalised energy ``sum_l sum_{i<k_l} s_l[i]^2``
  (each layer's ``sum_j s_lj^2`` is the token count, so layers weigh alike): a global top-K
  of the statistic over all layers.
* ``minimax`` -- equalise the energy fraction every layer captures (maximise the smallest).
  Layers that flock little (flat ``s``) get more neurons.
* ``output`` (``greedy`` on :func:`output_gains`) -- maximise the captured *relative residual
  update*: neuron ``j`` of layer ``l`` gains ``sum_t z_tj^2 * ||W_down[:, j]||^2 / ||h_t||^2``
  (``h_t`` the residual stream entering the layer); layers whose FF output is large against
  the stream (typically the first and last) get more.
* ``protect`` -- the first and last layers dense, the others share the rest evenly.

Every layer keeps at least ``min_k`` (>= 1) and at most ``max_k`` (<= ``d_ff``) neurons;
totals are met exactly (to a multiple of ``multiple_of`` per layer); ties go to the lower
rank within the layer, then to the lower layer (equal gains give an even spread), so the same
inputs always give the same budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from griffin_export.core.budgets import (
    BUDGETS,
    _bounds,  # the package's own size bounds, so both modules round alike
    check_budget,
    protect_budget,
    uniform_budget,
)
from griffin_export.errors import UsageError

#: Everything :func:`layer_budgets` computes.
METHODS = (*BUDGETS, "energy", "minimax", "greedy")


# -- gains ---------------------------------------------------------------------------------------


def selection_order(scores: Tensor) -> Tensor:
    """Neuron indices in the order GRIFFIN keeps them: statistic descending, ties to the lower
    index (the order of `top_k_indices` before its final sort)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def energy_gains(scores: Tensor) -> Tensor:
    """``s^2`` in selection order (``[d_ff]`` float64): the normalised energy each kept neuron
    adds."""
    return scores.double()[selection_order(scores)].square()


def output_gains(
    scores: Tensor, square_sums: Tensor, down_column_norms: Tensor, stream_weight: float = 1.0
) -> Tensor:
    """Relative residual-update gains in selection order (``[d_ff]`` float64).

    Args:
        scores: the GRIFFIN statistic ``s`` (``[d_ff]``), fixes the selection order.
        square_sums: ``sum_t z_tj^2 / ||h_t||^2`` (``[d_ff]``): the down-projection inputs
            over the prompt, each token divided by the squared norm of the residual stream
            entering the layer.
        down_column_norms: ``||W_down[:, j]||_2`` (``[d_ff]``).
        stream_weight: a constant factor (kept for callers that rescale layers).
    """
    gains = square_sums.double() * down_column_norms.double().square() * stream_weight
    return gains[selection_order(scores)]


# -- allocation ----------------------------------------------------------------------------------


def layer_budgets(
    method: str,
    gains: Sequence[Tensor],
    total: int,
    *,
    min_k: int = 1,
    max_k: int | None = None,
    multiple_of: int = 1,
    protect: Sequence[int] = (),
) -> list[int]:
    """Neurons kept per layer under ``method`` for a total of ``total`` neurons.

    Args:
        method: one of :data:`METHODS`.
        gains: per layer, ``[d_ff]`` non-negative gains in selection order (see the module
            docstring); for ``uniform`` and ``protect`` only their lengths are used.
        total: neurons kept over all layers, e.g. ``n_layers * keep_count(d_ff, ratio)``.
        min_k: every layer keeps at least this many (at least 1).
        max_k: and at most this many (default ``d_ff``).
        multiple_of: every ``k_l`` is a multiple of this (``total`` must be one too).
        protect: layers (negative indices count from the end) that keep ``max_k`` before the
            others share what is left by ``method`` (evenly for ``uniform``/``protect``).
            Empty (the default) leaves every method as described above; ignored when the
            total cannot keep them dense and give every other layer ``min_k``.

    Returns:
        ``k_l`` per layer, summing to ``total``.
    """
    check_budget(method, METHODS)
    n, d_ff = _check_gains(gains)
    lo, hi = _bounds(d_ff, min_k, max_k, multiple_of)
    if total % multiple_of or not n * lo <= total <= n * hi:
        raise UsageError(
            f"a total of {total} kept neurons cannot be spread over {n} layers with "
            f"{lo}..{hi} per layer in multiples of {multiple_of}; choose another --ratio"
        )
    kept = sorted({p % n for p in protect})
    if kept and len(kept) < n and total - len(kept) * hi >= (n - len(kept)) * lo:
        # The named layers keep max_k; the others share the rest by the method (``uniform``
        # and ``protect`` as evenly as multiples allow).
        rest = [i for i in range(n) if i not in kept]
        remaining = total - len(kept) * hi
        if method in ("uniform", "protect"):
            inner = even_budget(len(rest), remaining, multiple_of)
        else:
            inner = layer_budgets(
                method,
                [gains[i] for i in rest],
                remaining,
                min_k=lo,
                max_k=hi,
                multiple_of=multiple_of,
            )
        out = [hi] * n
        for i, k in zip(rest, inner, strict=True):
            out[i] = k
        return out
    if method == "uniform":
        if total % n:
            raise UsageError(
                f"a uniform budget needs a total divisible by {n} layers, got {total}; "
                "use keep_count() per layer"
            )
        return uniform_budget(n, total // n)
    if method == "protect":
        return protect_budget(n, total, lo, hi, multiple_of)
    if method == "minimax":
        return minimax_budget(gains, total, lo, hi, multiple_of)
    return greedy_budget(gains, total, lo, hi, multiple_of)


def even_budget(n: int, total: int, multiple_of: int = 1) -> list[int]:
    """``total`` spread over ``n`` layers as evenly as multiples of ``multiple_of`` allow
    (earlier layers get the odd groups)."""
    groups, spare = divmod(total // multiple_of, n)
    return [(groups + (1 if i < spare else 0)) * multiple_of for i in range(n)]


def greedy_budget(
    gains: Sequence[Tensor], total: int, lo: int, hi: int, multiple_of: int = 1
) -> list[int]:
    """Maximise ``sum_l sum_{i<k_l} g_l[i]`` subject to ``sum_l k_l = total`` and
    ``lo <= k_l <= hi`` (multiples of ``multiple_of``).

    Gains are made non-increasing along each layer first (the slopes of the concave hull of
    the cumulative gain, by pool-adjacent-violators), so the global greedy choice is optimal
    for that hull. Groups of ``multiple_of`` neurons are chosen at once.
    """
    return _spend_greedily(gains, [lo] * len(gains), total - len(gains) * lo, hi, multiple_of)


def minimax_budget(
    gains: Sequence[Tensor], total: int, lo: int, hi: int, multiple_of: int = 1
) -> list[int]:
    """Maximise the smallest captured fraction ``sum_{i<k_l} g_l[i] / sum_i g_l[i]`` over
    layers, then spend what is left greedily by gain.

    The largest fraction ``phi`` whose per-layer needs fit in ``total`` is found by bisection
    (each layer's need is the smallest ``k`` reaching ``phi``, clamped to ``lo..hi``).
    """
    fractions = []
    for g in gains:
        cum = torch.cumsum(g.double(), 0)
        fractions.append(cum / cum[-1].clamp_min(torch.finfo(torch.float64).tiny))

    def need(phi: float) -> list[int]:
        out = []
        for frac in fractions:
            k = int(torch.searchsorted(frac, torch.tensor([phi], dtype=frac.dtype)).item()) + 1
            k = math.ceil(k / multiple_of) * multiple_of
            out.append(min(max(k, lo), hi))
        return out

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if sum(need(mid)) <= total:
            low = mid
        else:
            high = mid
    base = need(low)
    extra = total - sum(base)
    if extra <= 0:
        return base
    # Spend the remainder greedily: the same as greedy_budget starting from ``base``.
    return _spend_greedily(gains, base, extra, hi, multiple_of)


def blend(budget: Sequence[int], k: int, weight: float, multiple_of: int = 1) -> list[int]:
    """``k + weight * (budget - k)`` per layer, rounded to multiples while keeping the total
    ``len(budget) * k`` when ``budget`` sums to it (largest remainders get the spare groups,
    ties to the lower layer)."""
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"a budget blend weight must be in [0, 1], got {weight}")
    total = sum(budget)
    exact = [(k + weight * (b - k)) / multiple_of for b in budget]
    out = [math.floor(x) for x in exact]
    spare = total // multiple_of - sum(out)
    order = sorted(range(len(budget)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:spare]:
        out[i] += 1
    return [x * multiple_of for x in out]


# -- helpers -------------------------------------------------------------------------------------


def _check_gains(gains: Sequence[Tensor]) -> tuple[int, int]:
    if not gains:
        raise UsageError("no layers to budget; the model has no FF layers griffin can prune")
    widths = {int(g.numel()) for g in gains}
    if len(widths) != 1 or 0 in widths:
        raise UsageError(f"per-layer statistics must share one non-zero width, got {widths}")
    for layer, g in enumerate(gains):
        if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
            raise UsageError(
                f"layer {layer}: budget gains must be finite and non-negative; the prompt "
                "produced NaN/inf activations (try --dtype float32)"
            )
    return len(gains), widths.pop()


def _spend_greedily(
    gains: Sequence[Tensor], base: list[int], extra: int, hi: int, multiple_of: int
) -> list[int]:
    """Add ``extra`` neurons to ``base`` (in groups of ``multiple_of``, at most ``hi`` per
    layer) by descending hull gain; ties to the lower group, then the lower layer."""
    budget = list(base)
    chunks: list[tuple[float, int, int]] = []  # (-gain, group, layer): deterministic order
    for layer, g in enumerate(gains):
        hull = _decreasing_slopes(g.double())
        groups = hull[: (hi // multiple_of) * multiple_of].reshape(-1, multiple_of).sum(dim=1)
        for group in range(budget[layer] // multiple_of, groups.numel()):
            chunks.append((-float(groups[group]), group, layer))
    chunks.sort()
    for _, _, layer in chunks[: extra // multiple_of]:
        budget[layer] += multiple_of
    return budget


def _decreasing_slopes(g: Tensor) -> Tensor:
    """Pool adjacent violators: the non-increasing sequence whose running sum is the least
    concave majorant of ``cumsum(g)`` (equal to ``g`` when ``g`` is already non-increasing)."""
    values: list[float] = []
    counts: list[int] = []
    for x in g.tolist():
        value, count = float(x), 1
        while values and values[-1] < value:
            prev, n = values.pop(), counts.pop()
            value = (prev * n + value * count) / (n + count)
            count += n
        values.append(value)
        counts.append(count)
    out = torch.empty(g.numel(), dtype=torch.float64)
    start = 0
    for value, count in zip(values, counts, strict=True):
        out[start : start + count] = value
        start += count
    return out
