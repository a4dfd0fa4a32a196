"""The GRIFFIN statistic, k and top-k against direct loop-based computations."""

from __future__ import annotations

import math

import pytest
import torch

from griffin_export.errors import UsageError
from griffin_export.scoring import (
    griffin_statistic,
    jaccard,
    keep_count,
    normalized_square_sum,
    top_k_indices,
)


def loop_statistic(z: list[list[float]]) -> list[float]:
    """s_j = sqrt(sum_t (z_tj / ||z_t||)^2), written out with Python loops."""
    d = len(z[0])
    s = [0.0] * d
    for row in z:
        norm = math.sqrt(sum(v * v for v in row))
        if norm == 0.0:
            continue
        for j, v in enumerate(row):
            s[j] += (v / norm) ** 2
    return [math.sqrt(v) for v in s]


def test_statistic_matches_loop_with_zero_norm_token() -> None:
    z = [
        [1.0, -2.0, 0.0, 0.5, 3.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],  # a token whose activations are all zero
        [-0.1, 0.2, 4.0, 0.0, -1.0],
        [2.5, 2.5, 2.5, 2.5, 2.5],
    ]
    got = griffin_statistic(torch.tensor(z))
    want = torch.tensor(loop_statistic(z))
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()
    # sum_j s_j^2 counts the non-zero tokens
    assert got.square().sum().item() == pytest.approx(3.0, rel=1e-6)


def test_statistic_is_float32_and_pools_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 11, generator=g).to(torch.bfloat16)
    whole = griffin_statistic(z)
    assert whole.dtype == torch.float32
    chunks = normalized_square_sum(z[0]) + normalized_square_sum(z[1])
    torch.testing.assert_close(griffin_statistic(chunks, accumulated=True), whole)
    want = torch.tensor(loop_statistic(z.float().reshape(-1, 11).tolist()))
    torch.testing.assert_close(whole, want)


def test_top_k_breaks_ties_by_lower_index_and_sorts() -> None:
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0, 2.0, 0.1])
    assert top_k_indices(scores, 2).tolist() == [1, 3]
    assert top_k_indices(scores, 4).tolist() == [1, 2, 3, 5]
    assert top_k_indices(torch.zeros(5), 3).tolist() == [0, 1, 2]
    assert top_k_indices(scores, 7).tolist() == list(range(7))


def test_top_k_is_deterministic_on_large_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (5000,), generator=g).float()  # many ties
    first = top_k_indices(scores, 1234)
    assert torch.equal(first, top_k_indices(scores.clone(), 1234))
    assert first.unique().numel() == 1234
    assert torch.all(first[1:] > first[:-1])
    kept = scores[first]
    dropped = scores[torch.ones(5000, dtype=torch.bool).index_fill(0, first, False)]
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize(
    ("d_ff", "ratio", "multiple_of", "k"),
    [
        (1536, 0.5, 1, 768),
        (37, 0.5, 1, 18),  # round-half-to-even of 18.5
        (37, 1.0, 8, 37),  # ratio 1 keeps everything, even off a multiple
        (14336, 0.5, 128, 7168),
        (100, 0.33, 16, 32),
        (100, 0.01, 16, 16),  # at least one multiple
        (100, 0.99, 16, 96),  # never above d_ff
        (10, 0.5, 64, 10),  # multiple larger than d_ff: keep d_ff
        (37, 0.01, 1, 1),
    ],
)
def test_keep_count(d_ff: int, ratio: float, multiple_of: int, k: int) -> None:
    assert keep_count(d_ff, ratio, multiple_of) == k


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan"), float("inf")])
def test_bad_ratio_is_a_usage_error(ratio: float) -> None:
    with pytest.raises(UsageError, match="--ratio"):
        keep_count(100, ratio)


@pytest.mark.parametrize("multiple_of", [0, -8])
def test_bad_multiple_is_a_usage_error(multiple_of: int) -> None:
    with pytest.raises(UsageError, match="--multiple-of"):
        keep_count(100, 0.5, multiple_of)


def test_jaccard() -> None:
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(0.5)
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0
