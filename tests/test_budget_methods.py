"""The ablation's allocations (benchmarks/budget_methods.py, not offered by ``--budget``):
totals, bounds, and optimality against brute force over every allocation of small cases."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from budget_methods import (  # benchmarks/, put on the path above
    METHODS,
    blend,
    energy_gains,
    layer_budgets,
    output_gains,
    selection_order,
)

from griffin_export.core.scoring import griffin_statistic
from griffin_export.errors import UsageError


def _scores(n_layers: int = 6, d_ff: int = 37, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n_layers):
        # layers flock differently: sharper activations in later layers
        z = torch.randn(50, d_ff, generator=g) ** (1 + layer % 3)
        out.append(griffin_statistic(z))
    return out


def _gains(method: str, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    if method == "greedy":
        g = torch.Generator().manual_seed(1)
        return [
            output_gains(s, torch.rand(s.numel(), generator=g), torch.rand(s.numel(), generator=g))
            for s in scores
        ]
    return [energy_gains(s) for s in scores]


def _allocations(n: int, total: int, lo: int, hi: int, step: int = 1) -> list[tuple[int, ...]]:
    """Every ``(k_1..k_n)`` in multiples of ``step`` within ``lo..hi`` summing to ``total``."""
    sizes = range(lo, hi + 1, step)
    return [ks for ks in itertools.product(sizes, repeat=n) if sum(ks) == total]


def _captured(gains: list[torch.Tensor], ks: tuple[int, ...] | list[int]) -> float:
    return sum(float(g[:k].sum()) for g, k in zip(gains, ks, strict=True))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio_k", [2, 9, 18, 28, 33, 37])
def test_budgets_sum_to_total_within_bounds(method: str, ratio_k: int) -> None:
    """Catches an allocation that loses or invents neurons (rounding, an off-by-one in the
    greedy loop) or leaves a layer empty or above d_ff."""
    scores = _scores()
    total = len(scores) * ratio_k
    budget = layer_budgets(method, _gains(method, scores), total)
    assert sum(budget) == total
    assert all(1 <= k <= 37 for k in budget)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("multiple_of", [1, 2])
def test_greedy_is_optimal_against_brute_force(seed: int, multiple_of: int) -> None:
    """On non-increasing gains the greedy allocation captures the most total gain of all
    allocations. Catches a greedy that sorts gains the wrong way, starts a layer's groups at
    the wrong offset or spends groups across the ``hi`` bound."""
    g = torch.Generator().manual_seed(seed)
    gains = [torch.sort(torch.rand(8, generator=g).double(), descending=True).values]
    gains += [torch.sort(torch.rand(8, generator=g).double() ** 3, descending=True).values]
    gains += [torch.sort(torch.rand(8, generator=g).double() * 2, descending=True).values]
    lo, hi, total = 2, 6, 12
    budget = layer_budgets("greedy", gains, total, min_k=lo, max_k=hi, multiple_of=multiple_of)
    best = max(_captured(gains, ks) for ks in _allocations(3, total, lo, hi, multiple_of))
    assert sum(budget) == total and all(lo <= k <= hi and k % multiple_of == 0 for k in budget)
    assert _captured(gains, budget) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_minimax_maximises_the_smallest_captured_fraction(seed: int) -> None:
    """The smallest per-layer captured energy fraction equals the best over all allocations.
    Catches minimax computed as energy's global top-K (a lower smallest fraction in 5 of
    these 6 cases), or a bisection that stops below the best fraction."""
    g = torch.Generator().manual_seed(seed)
    # layers of very different sharpness, where energy's global top-K is not the minimax
    gains = [
        energy_gains(griffin_statistic(torch.randn(20, 9, generator=g) ** p)) for p in (1, 3, 5)
    ]
    total = 14

    def smallest_fraction(ks: tuple[int, ...] | list[int]) -> float:
        return min(float(g[:k].sum() / g.sum()) for g, k in zip(gains, ks, strict=True))

    budget = layer_budgets("minimax", gains, total)
    best = max(smallest_fraction(ks) for ks in _allocations(3, total, 1, 9))
    assert sum(budget) == total
    assert smallest_fraction(budget) >= best - 1e-9


def test_ties_are_broken_by_lower_layer() -> None:
    """Equal gains everywhere: the spare neuron goes to layer 0. Catches a tie order on the
    layer index reversed (or left to dict/set order)."""
    gains = [torch.ones(10, dtype=torch.float64)] * 3
    assert layer_budgets("energy", gains, 16) == [6, 5, 5]


@pytest.mark.parametrize("method", ["energy", "minimax", "greedy"])
def test_bounds_and_multiples(method: str) -> None:
    """Catches min_k/max_k/multiple_of ignored by one method."""
    scores = _scores(n_layers=5, d_ff=64)
    budget = layer_budgets(method, _gains(method, scores), 5 * 24, min_k=8, max_k=40, multiple_of=8)
    assert sum(budget) == 120
    assert all(8 <= k <= 40 and k % 8 == 0 for k in budget)


def test_protect_keeps_first_and_last_dense() -> None:
    """Catches protect naming the wrong layers or spreading the rest unevenly."""
    scores = _scores(n_layers=6, d_ff=40)
    budget = layer_budgets("protect", _gains("protect", scores), 6 * 20)
    assert budget == [40, 10, 10, 10, 10, 40]


def test_protect_option_composes_with_a_method() -> None:
    """Catches ``protect=`` ignored by the gain-driven methods (or -1 not counted from the
    end)."""
    scores = _scores(n_layers=6, d_ff=40)
    budget = layer_budgets("greedy", _gains("greedy", scores), 6 * 20, protect=(0, -1))
    assert budget[0] == budget[-1] == 40 and sum(budget) == 120


def test_uniform_is_griffin() -> None:
    """Uniform keeps GRIFFIN's k = round(0.5 * 37) = 18 in every layer. Catches a uniform
    path that goes through the gain-driven allocation."""
    scores = _scores()
    assert layer_budgets("uniform", _gains("uniform", scores), len(scores) * 18) == [18] * 6


def test_energy_is_global_top_k_of_the_statistic() -> None:
    """Catches energy gains that are not s^2 or a per-layer instead of a global top-K."""
    scores = _scores(n_layers=4, d_ff=20)
    total = 33
    budget = layer_budgets("energy", _gains("energy", scores), total)
    flat = torch.cat([s.double() ** 2 for s in scores])
    threshold = torch.sort(flat, descending=True).values[total - 1]
    assert budget == [int((s.double() ** 2 >= threshold).sum()) for s in scores]


def test_minimax_favours_flat_layers() -> None:
    """Catches minimax that maximises total energy (which would favour the sharp layer)."""
    flat = torch.full((20,), 1.0)
    sharp = torch.tensor([10.0] + [0.01] * 19)
    budget = layer_budgets("minimax", [energy_gains(flat), energy_gains(sharp)], 20)
    assert budget[0] > budget[1]


def test_selection_order_breaks_ties_to_lower_index() -> None:
    """Catches an unstable or ascending sort."""
    assert selection_order(torch.tensor([1.0, 2.0, 2.0, 0.5])).tolist() == [1, 2, 0, 3]


def test_output_gains_are_in_selection_order() -> None:
    """gain_j = square_sums_j * ||W_down[:, j]||^2, listed in statistic order. Catches gains
    left in neuron order or norms not squared."""
    scores = torch.tensor([0.1, 0.9, 0.5])
    got = output_gains(scores, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 0.5]))
    assert got.tolist() == [2.0 * 1.0, 3.0 * 0.25, 1.0 * 4.0]


def test_blend_keeps_total() -> None:
    """Catches a blend that rounds each layer independently (losing the total)."""
    assert sum(blend([10, 30, 20, 20], 20, 0.5)) == 80
    assert blend([10, 30, 20, 20], 20, 0.0) == [20] * 4
    assert blend([10, 30, 20, 20], 20, 1.0) == [10, 30, 20, 20]
    assert blend([10, 31, 19, 20], 20, 0.5) == [15, 26, 19, 20]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "bogus", "total": 10}, "--budget 'bogus'"),
        ({"method": "energy", "total": 10_000}, "cannot be spread"),
        ({"method": "energy", "total": 2}, "cannot be spread"),
        ({"method": "uniform", "total": 13}, "divisible"),
    ],
)
def test_errors_name_the_value(kwargs: dict[str, object], fragment: str) -> None:
    """Catches out-of-range totals silently clamped."""
    gains = _gains("energy", _scores(n_layers=3))
    with pytest.raises(UsageError, match=fragment):
        layer_budgets(str(kwargs["method"]), gains, int(str(kwargs["total"])))


def test_nan_gains_are_refused() -> None:
    """Catches NaN gains sorted into an arbitrary budget."""
    gains = [torch.tensor([1.0, float("nan")])] * 2
    with pytest.raises(UsageError, match="layer 0"):
        layer_budgets("energy", gains, 2)


def test_uniform_with_protected_layers_shares_the_rest_evenly() -> None:
    """Catches the protected layers' neurons counted twice or the odd neuron given to the
    last layer."""
    gains = _gains("energy", _scores(n_layers=6, d_ff=100))
    assert layer_budgets("uniform", gains, 400, protect=(0, 1, -1)) == [100, 100, 34, 33, 33, 100]
