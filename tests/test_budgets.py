"""Per-layer budgets griffin export and griffin ppl offer (griffin_export.core.budgets.layer_sizes:
uniform, protect): totals, bounds, and exact sizes worked out by hand. The ablation's other
allocations are tested in test_budget_methods.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from griffin_export.core.budgets import BUDGETS, layer_sizes
from griffin_export.core.scoring import keep_count
from griffin_export.errors import UsageError


@pytest.mark.parametrize("budget", BUDGETS)
def test_layer_sizes_sum_to_the_uniform_total_within_bounds(budget: str) -> None:
    """Over a grid of shapes: the uniform total, every layer in 1..d_ff, multiples kept.
    Catches protect losing or inventing neurons when it clamps the dense ends."""
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


def test_uniform_layer_sizes_are_griffin() -> None:
    """round(0.4 * 37 / 8) * 8 = 16. Catches uniform sizes that ignore --multiple-of."""
    assert layer_sizes("uniform", 30, 1536, 0.5) == [768] * 30
    assert layer_sizes("uniform", 3, 37, 0.4, 8) == [16] * 3


def test_protect_layer_sizes() -> None:
    """Sizes worked out by hand. Catches protect naming the wrong layers, not clamping the
    dense ends when the total is short, or spreading the odd neurons unevenly."""
    sizes = layer_sizes("protect", 30, 1536, 0.5)  # SmolLM2's shape
    assert sizes[0] == sizes[-1] == 1536
    assert sum(sizes) == 30 * 768 and max(sizes[1:-1]) - min(sizes[1:-1]) <= 1
    # the total cannot keep both ends dense: they keep as much as leaves the rest one neuron
    assert layer_sizes("protect", 3, 37, 0.4) == [22, 1, 22]
    assert layer_sizes("protect", 3, 37, 0.8) == [37, 16, 37]
    assert layer_sizes("protect", 4, 64, 0.5, 8) == [56, 8, 8, 56]  # multiples of 8
    assert layer_sizes("protect", 2, 37, 0.5) == [18, 18]  # both layers are the "ends"


def test_unknown_budget_names_the_value_and_the_choices() -> None:
    """Catches the ablation's methods (energy, ...) leaking into what --budget accepts."""
    with pytest.raises(
        UsageError, match=r"--budget 'energy' is not known; use one of uniform, protect"
    ):
        layer_sizes("energy", 3, 37, 0.5)


def test_select_experts_with_per_layer_sizes() -> None:
    """select_experts with protect's sizes keeps, per layer, the plain top-k_l of the statistic
    recomputed with a Python loop from the down-projection inputs. Catches the uniform k used
    in place of k_per_layer, sizes applied to the wrong layers, or scores that change with k."""
    from griffin_export.core.architectures import spec_for
    from griffin_export.core.selection import select_experts

    from tiny import (
        D_FF,
        LAYERS,
        capture_down_inputs,
        loop_statistic,
        plain_top_k,
        random_ids,
        tiny_model,
    )

    spec = spec_for("llama")
    ids = random_ids(30, seed=2)
    sizes = layer_sizes("protect", LAYERS, D_FF, 0.8)
    assert sizes == [37, 16, 37]
    chosen = select_experts(spec, tiny_model("llama"), [ids], 0.8, k_per_layer=sizes)
    assert chosen.k_per_layer == sizes
    for layer, z in enumerate(capture_down_inputs(spec, tiny_model("llama"), ids)):
        want = loop_statistic(z)
        torch.testing.assert_close(
            chosen.scores[layer].double(),
            torch.tensor(want, dtype=torch.float64),
            rtol=1e-5,
            atol=0,
        )
        assert chosen.keep[layer].tolist() == plain_top_k(want, sizes[layer]), layer
    with pytest.raises(UsageError, match="k_per_layer"):
        select_experts(spec, tiny_model("llama"), [ids], 0.5, k_per_layer=[0, 5, 5])
