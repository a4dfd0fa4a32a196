"""The GRIFFIN statistic, k and top-k against direct loop-based computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from griffin_export.core.scoring import (
    griffin_statistic,
    jaccard,
    keep_count,
    normalized_square_sum,
    top_k_indices,
)
from griffin_export.errors import UsageError

from tiny import capture_down_inputs, loop_statistic, plain_top_k


def test_statistic_matches_loop_with_zero_norm_token() -> None:
    """Catches a missing per-token normalisation, a norm over neurons instead of tokens, or a
    zero-norm token turned into NaN."""
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
    """bfloat16 input, statistic in float32; chunks accumulated equal the loop over all
    tokens. Catches statistics computed in the model's dtype, or chunks pooled by summing
    square roots instead of squares."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 11, generator=g).to(torch.bfloat16)
    want = torch.tensor(loop_statistic(z.float().reshape(-1, 11).tolist()), dtype=torch.float32)
    whole = griffin_statistic(z)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole, want)
    chunks = normalized_square_sum(z[0]) + normalized_square_sum(z[1])
    torch.testing.assert_close(griffin_statistic(chunks, accumulated=True), want)


def test_top_k_breaks_ties_by_lower_index_and_sorts() -> None:
    """Catches ties to the higher index (an unstable or reversed sort) or unsorted output."""
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0, 2.0, 0.1])
    assert top_k_indices(scores, 2).tolist() == [1, 3]
    assert top_k_indices(scores, 4).tolist() == [1, 2, 3, 5]
    assert top_k_indices(torch.zeros(5), 3).tolist() == [0, 1, 2]
    assert top_k_indices(scores, 7).tolist() == list(range(7))


def test_top_k_equals_the_plain_oracle_on_large_inputs_with_ties() -> None:
    """5000 scores with only four values (many ties across the k boundary) against a plain
    sorted() over (-score, index). Catches tie-breaking that depends on sort internals
    (torch's unstable sort or topk), which small inputs do not reveal."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (5000,), generator=g).float()
    for k in (1, 1234, 2500, 4999, 5000):
        assert top_k_indices(scores, k).tolist() == plain_top_k(scores, k), k


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0, float("1e-30")]), min_size=1, max_size=60),
    st.data(),
)
def test_top_k_equals_the_plain_oracle(values: list[float], data: st.DataObject) -> None:
    """Random small score vectors drawn from a few values (ties everywhere) and every k.
    Catches any tie order other than lower index first, and off-by-one k."""
    k = data.draw(st.integers(1, len(values)))
    assert top_k_indices(torch.tensor(values), k).tolist() == plain_top_k(values, k)


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
    """Values worked out by hand. Catches floor instead of round, k above d_ff or 0."""
    assert keep_count(d_ff, ratio, multiple_of) == k


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan"), float("inf")])
def test_bad_ratio_is_a_usage_error(ratio: float) -> None:
    """Catches NaN/inf or out-of-range ratios silently clamped."""
    with pytest.raises(UsageError, match="--ratio"):
        keep_count(100, ratio)


@pytest.mark.parametrize("multiple_of", [0, -8])
def test_bad_multiple_is_a_usage_error(multiple_of: int) -> None:
    """Catches a zero or negative multiple dividing by zero or flipping signs."""
    with pytest.raises(UsageError, match="--multiple-of"):
        keep_count(100, 0.5, multiple_of)


def test_jaccard() -> None:
    """Catches intersection over the smaller set instead of the union, and 0/0."""
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(0.5)
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


@pytest.mark.slow
def test_embedded_model_experts_equal_the_plain_loop_statistic(tmp_path: Path) -> None:
    """On the real embedded SmolLM2: the down-projection inputs captured by forward pre-hooks
    on the full transformers model, the statistic recomputed token by token in float64 and
    the plain sorted() top-k give, in every layer, exactly the experts that
    ``griffin_export.build.export`` stores in griffin_experts.safetensors (as a set and in the
    stored ascending order). Catches the streaming export scoring the wrong activation (the
    down projection's output, or gate/up before the product), pooling tokens wrongly,
    shifting layers, or storing indices unsorted or off by one."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from griffin_export import export, spec_for
    from griffin_export.storage.sources import resolve_source

    prompt = (
        "The river rises in the hills and runs south through the old town, past the mill "
        "and the bridge, until it meets the sea at a wide and shallow estuary."
    )
    ratio = 0.25  # the k-th and (k+1)-th scores are >= 4e-5 apart (relative) in every layer
    out = tmp_path / "export"
    result = export("smollm2-135m", [prompt], ratio, out=out)
    stored = load_file(str(out / "griffin_experts.safetensors"))

    directory = resolve_source("smollm2-135m").directory
    assert directory is not None
    ids = torch.tensor(AutoTokenizer.from_pretrained(directory)(prompt)["input_ids"])
    assert ids.numel() == result.prompt_tokens  # the same tokens the export pooled
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    spec = spec_for(model.config.model_type)
    captured = capture_down_inputs(spec, model, ids)
    assert len(captured) == len(stored) == 30
    k = 384  # round(0.25 * 1536)
    for layer, z in enumerate(captured):
        s = loop_statistic_tensor(z)
        values = s.tolist()
        ranked = sorted(range(len(values)), key=lambda j: (-values[j], j))
        # float32 (export) and float64 (here) agree on the order only if the boundary is
        # not a near-tie; fail loudly rather than compare noise
        gap = values[ranked[k - 1]] - values[ranked[k]]
        assert gap > 1e-5 * values[ranked[k - 1]], (layer, gap)
        want = plain_top_k(values, k)
        got = stored[f"layer.{layer}"].tolist()
        assert set(got) == set(want), layer
        assert got == want, layer


def loop_statistic_tensor(z: torch.Tensor) -> torch.Tensor:
    """The statistic token by token in float64 tensors (a Python loop over tokens; the
    pure-float loop in ``tiny.loop_statistic`` is too slow for 30 layers x 1536 neurons)."""
    acc = torch.zeros(z.shape[-1], dtype=torch.float64)
    for row in z.double():
        norm = torch.sqrt((row * row).sum())
        if norm > 0:
            acc += (row / norm) ** 2
    return acc.sqrt()
