"""Per-layer budgets (griffin_export.budgets): totals, bounds, determinism, uniform = GRIFFIN.

``layer_sizes`` (uniform, protect) is what griffin export and griffin ppl use; ``layer_budgets``
with the other methods serves benchmarks/ablation_budgets.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from griffin_export.budgets import (
    BUDGETS,
    METHODS,
    blend,
    energy_gains,
    layer_budgets,
    layer_sizes,
    output_gains,
    selection_order,
)
from griffin_export.errors import UsageError
from griffin_export.scoring import griffin_statistic, keep_count, top_k_indices


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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_budgets_sum_to_total_within_bounds(method: str, ratio: float) -> None:
    scores = _scores()
    d_ff = scores[0].numel()
    total = len(scores) * keep_count(d_ff, ratio)
    budget = layer_budgets(method, _gains(method, scores), total)
    assert sum(budget) == total
    assert all(1 <= k <= d_ff for k in budget)


@pytest.mark.parametrize("method", METHODS)
def test_budgets_are_deterministic(method: str) -> None:
    scores = _scores(seed=3)
    total = len(scores) * 17
    first = layer_budgets(method, _gains(method, scores), total)
    again = layer_budgets(method, _gains(method, [s.clone() for s in scores]), total)
    assert first == again


def test_ties_are_broken_by_lower_layer() -> None:
    gains = [torch.ones(10, dtype=torch.float64)] * 3
    assert layer_budgets("energy", gains, 16) == [6, 5, 5]


@pytest.mark.parametrize("method", ["energy", "minimax", "greedy"])
def test_bounds_and_multiples(method: str) -> None:
    scores = _scores(n_layers=5, d_ff=64)
    budget = layer_budgets(method, _gains(method, scores), 5 * 24, min_k=8, max_k=40, multiple_of=8)
    assert sum(budget) == 120
    assert all(8 <= k <= 40 and k % 8 == 0 for k in budget)


def test_protect_keeps_first_and_last_dense() -> None:
    scores = _scores(n_layers=6, d_ff=40)
    budget = layer_budgets("protect", _gains("protect", scores), 6 * 20)
    assert budget[0] == budget[-1] == 40
    assert sum(budget) == 120
    assert max(budget[1:-1]) - min(budget[1:-1]) <= 1


def test_protect_option_composes_with_a_method() -> None:
    scores = _scores(n_layers=6, d_ff=40)
    budget = layer_budgets("greedy", _gains("greedy", scores), 6 * 20, protect=(0, -1))
    assert budget[0] == budget[-1] == 40 and sum(budget) == 120


def test_uniform_is_griffin() -> None:
    scores = _scores()
    k = keep_count(37, 0.5)
    budget = layer_budgets("uniform", _gains("uniform", scores), len(scores) * k)
    assert budget == [k] * len(scores)
    for s, kk in zip(scores, budget, strict=True):
        assert torch.equal(top_k_indices(s, kk), top_k_indices(s, k))


def test_energy_is_global_top_k_of_the_statistic() -> None:
    scores = _scores(n_layers=4, d_ff=20)
    total = 33
    budget = layer_budgets("energy", _gains("energy", scores), total)
    flat = torch.cat([s.double() ** 2 for s in scores])
    threshold = torch.sort(flat, descending=True).values[total - 1]
    assert budget == [int((s.double() ** 2 >= threshold).sum()) for s in scores]


def test_minimax_favours_flat_layers() -> None:
    flat = torch.full((20,), 1.0)
    sharp = torch.tensor([10.0] + [0.01] * 19)
    budget = layer_budgets("minimax", [energy_gains(flat), energy_gains(sharp)], 20)
    assert budget[0] > budget[1]


def test_selection_order_breaks_ties_to_lower_index() -> None:
    assert selection_order(torch.tensor([1.0, 2.0, 2.0, 0.5])).tolist() == [1, 2, 0, 3]


def test_blend_keeps_total() -> None:
    assert sum(blend([10, 30, 20, 20], 20, 0.5)) == 80
    assert blend([10, 30, 20, 20], 20, 0.0) == [20] * 4
    assert blend([10, 30, 20, 20], 20, 1.0) == [10, 30, 20, 20]


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
    gains = _gains("energy", _scores(n_layers=3))
    with pytest.raises(UsageError, match=fragment):
        layer_budgets(str(kwargs["method"]), gains, int(str(kwargs["total"])))


def test_nan_gains_are_refused() -> None:
    gains = [torch.tensor([1.0, float("nan")])] * 2
    with pytest.raises(UsageError, match="layer 0"):
        layer_budgets("energy", gains, 2)


def test_uniform_with_protected_layers_shares_the_rest_evenly() -> None:
    gains = _gains("energy", _scores(n_layers=6, d_ff=100))
    assert layer_budgets("uniform", gains, 400, protect=(0, 1, -1)) == [100, 100, 34, 33, 33, 100]


# -- the budgets griffin export and griffin ppl offer -------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_layer_sizes_sum_to_the_uniform_total_within_bounds(budget: str) -> None:
    grid = itertools.product(
        [1, 2, 3, 4, 30], [1, 2, 37, 1536], [0.01, 0.25, 0.5, 0.9, 1.0], [1, 8]
    )
    for n_layers, d_ff, ratio, multiple_of in grid:
        case = (n_layers, d_ff, ratio, multiple_of)
        k = keep_count(d_ff, ratio, multiple_of)
        sizes = layer_sizes(budget, n_layers, d_ff, ratio, multiple_of)
        assert len(sizes) == n_layers and sum(sizes) == n_layers * k, case
        assert all(1 <= s <= d_ff for s in sizes), case
        if k < d_ff:  # keep_count's multiples (ratio 1 keeps an odd d_ff whole)
            assert all(s % multiple_of == 0 for s in sizes), case
        assert sizes == layer_sizes(budget, n_layers, d_ff, ratio, multiple_of), case


def test_uniform_layer_sizes_are_griffin() -> None:
    assert layer_sizes("uniform", 30, 1536, 0.5) == [768] * 30
    assert layer_sizes("uniform", 3, 37, 0.4, 8) == [keep_count(37, 0.4, 8)] * 3


def test_protect_layer_sizes() -> None:
    sizes = layer_sizes("protect", 30, 1536, 0.5)  # SmolLM2's shape
    assert sizes[0] == sizes[-1] == 1536
    assert sum(sizes) == 30 * 768 and max(sizes[1:-1]) - min(sizes[1:-1]) <= 1
    # the total cannot keep both ends dense: they keep as much as leaves the rest one neuron
    assert layer_sizes("protect", 3, 37, 0.4) == [22, 1, 22]
    assert layer_sizes("protect", 3, 37, 0.8) == [37, 16, 37]
    assert layer_sizes("protect", 4, 64, 0.5, 8) == [56, 8, 8, 56]  # multiples of 8
    assert layer_sizes("protect", 2, 37, 0.5) == layer_sizes("uniform", 2, 37, 0.5)


def test_unknown_budget_names_the_value_and_the_choices() -> None:
    with pytest.raises(
        UsageError, match=r"--budget 'energy' is not known; use one of uniform, protect"
    ):
        layer_sizes("energy", 3, 37, 0.5)


def test_select_experts_with_per_layer_sizes() -> None:
    from griffin_export.architectures import spec_for
    from griffin_export.selection import select_experts

    from tiny import D_FF, LAYERS, random_ids, tiny_model

    spec = spec_for("llama")
    ids = [random_ids(30, seed=2)]
    sizes = layer_sizes("protect", LAYERS, D_FF, 0.8)
    uniform = select_experts(spec, tiny_model("llama"), ids, 0.8)
    chosen = select_experts(spec, tiny_model("llama"), ids, 0.8, k_per_layer=sizes)
    assert chosen.k_per_layer == sizes
    for keep, s in zip(chosen.keep, chosen.scores, strict=True):
        assert torch.equal(keep, top_k_indices(s, keep.numel()))
    assert all(torch.equal(a, b) for a, b in zip(chosen.scores, uniform.scores, strict=True))
    with pytest.raises(UsageError, match="k_per_layer"):
        select_experts(spec, tiny_model("llama"), ids, 0.5, k_per_layer=[0, 5, 5])
