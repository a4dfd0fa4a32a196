"""Per-layer budgets that ``griffin export`` and ``griffin ppl`` offer (``--budget``): how many
FF neurons each layer keeps, for a fixed total. Pure math.

GRIFFIN keeps the same ``k = ratio * d_ff`` in every layer (``uniform``). ``protect`` spends the
same total ``K = n_layers * k`` unevenly: the first and last layers dense, the others share the
rest evenly. Both depend on the config alone (:func:`layer_sizes`): the streaming export writes
each layer's pruned tensors as soon as that layer is scored, so every size must be known before
the forward.

Allocations that need every layer's statistic first (global top-K of the statistic, equalised
captured energy, residual share, Fisher) live with their ablation in
``benchmarks/budget_methods.py`` (``benchmarks/ablation_budgets.py``,
``benchmarks/RESULTS-budgets.md``); none beat ``protect``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from griffin_export.core.scoring import keep_count
from griffin_export.errors import UsageError

#: What ``--budget`` offers (export and ppl): per-layer sizes from the config alone.
BUDGETS = ("uniform", "protect")
#: The default of ``--budget``: ``uniform`` keeps exports loadable by stock ``from_pretrained``
#: (and vLLM, llama.cpp converters), although ``protect`` measured better at every keep ratio
#: (benchmarks/RESULTS-budgets.md).
DEFAULT_BUDGET = "uniform"


def check_budget(name: str, allowed: Sequence[str] = BUDGETS) -> str:
    """Return ``name`` if it is a known budget method, else raise naming the choices."""
    if name not in allowed:
        raise UsageError(f"--budget '{name}' is not known; use one of {', '.join(allowed)}")
    return name


def layer_sizes(
    budget: str, n_layers: int, d_ff: int, ratio: float, multiple_of: int = 1
) -> list[int]:
    """Neurons kept per layer under ``budget`` (one of :data:`BUDGETS`): in total
    ``n_layers * keep_count(d_ff, ratio, multiple_of)``, each layer in ``1..d_ff``.

    ``uniform`` is ``keep_count`` in every layer; ``protect`` keeps the first and last layers
    dense as far as the total allows every other layer one multiple, and spreads the rest
    evenly over the others (:func:`protect_budget`).
    """
    check_budget(budget)
    for name, value in (("n_layers", n_layers), ("d_ff", d_ff)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(
                f"layer_sizes: {name} must be a positive integer, got {value!r}; pass the "
                "model's layer count and FF width"
            )
    k = keep_count(d_ff, ratio, multiple_of)
    if budget == "uniform" or k == d_ff:
        return uniform_budget(n_layers, k)
    lo, hi = _bounds(d_ff, 1, None, multiple_of)
    return protect_budget(n_layers, n_layers * k, lo, hi, multiple_of)


def uniform_budget(n_layers: int, k: int) -> list[int]:
    """GRIFFIN: ``k`` in every layer."""
    return [int(k)] * n_layers


def protect_budget(n: int, total: int, lo: int, hi: int, multiple_of: int = 1) -> list[int]:
    """The first and last layers keep ``hi`` (if the total allows), the others share the rest
    as evenly as multiples of ``multiple_of`` allow (earlier layers get the odd groups)."""
    protected = [0, n - 1] if n > 1 else [0]
    budget = [0] * n
    rest = [i for i in range(n) if i not in protected]
    top = hi
    while protected and top > lo and total - len(protected) * top < len(rest) * lo:
        top -= multiple_of
    for i in protected:
        budget[i] = top
    remaining = total - len(protected) * top
    if rest:
        groups, spare = divmod(remaining // multiple_of, len(rest))
        for j, i in enumerate(rest):
            budget[i] = (groups + (1 if j < spare else 0)) * multiple_of
        overflow = [i for i in rest if budget[i] > hi]
        if overflow:  # only when top was clamped; hand the excess back to the protected layers
            excess = sum(budget[i] - hi for i in overflow)
            for i in overflow:
                budget[i] = hi
            for i in protected:
                give = min(excess, hi - budget[i])
                budget[i] += give
                excess -= give
    else:
        budget[protected[0]] += remaining
    return budget


def _bounds(d_ff: int, min_k: int, max_k: int | None, multiple_of: int) -> tuple[int, int]:
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise UsageError(f"--multiple-of must be a positive integer, got {multiple_of!r}")
    hi = d_ff if max_k is None else min(max_k, d_ff)
    hi = (hi // multiple_of) * multiple_of
    lo = max(1, min_k)
    lo = math.ceil(lo / multiple_of) * multiple_of
    if hi < lo:
        raise UsageError(
            f"no per-layer size fits: at least {lo} and at most {hi} neurons in multiples of "
            f"{multiple_of} (d_ff {d_ff}); lower --multiple-of"
        )
    return lo, hi
