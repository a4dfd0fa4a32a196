"""Compensation (issue 16): the closed-form ridge refit against independent oracles."""

from __future__ import annotations

import math

import pytest
import torch

from griffin_export.compensation import GramStats, check_alpha, check_method, refit_down
from griffin_export.errors import UsageError

D_FF, D_OUT = 23, 11


def problem(tokens: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, D_FF, generator=gen, dtype=torch.float64)
    z[:, 3] += 2.0  # a neuron with a non-zero mean, so the bias has something to carry
    w = torch.randn(D_OUT, D_FF, generator=gen, dtype=torch.float64)
    keep = torch.sort(torch.randperm(D_FF, generator=gen)[:k]).values
    return z, w, keep


def stats_of(z: torch.Tensor) -> GramStats:
    stats = GramStats.zeros(z.shape[1], dtype=torch.float64)
    for chunk in z.split(7):  # accumulated in chunks, as a prompt pass does
        stats.add(chunk)
    return stats


def lstsq_oracle(
    z: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, alpha: float, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge as ordinary least squares on the stacked system [Z_S 1; sqrt(lam) I 0]."""
    zs = z[:, keep]
    lam = alpha * float((zs * zs).sum(0).mean())
    k = keep.numel()
    y = z @ w.T
    top = torch.cat([zs, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) if bias else zs
    bottom = math.sqrt(lam) * torch.eye(k, top.shape[1], dtype=z.dtype)
    a = torch.cat([top, bottom])
    rhs = torch.cat([y, math.sqrt(lam) * w[:, keep].T])
    x = torch.linalg.lstsq(a, rhs, driver="gelsd").solution  # [k (+1), out]
    return x[:k].T, (x[k] if bias else None)


@pytest.mark.parametrize("tokens", [5, 15, 60])  # T < k and T > k (k = 12)
@pytest.mark.parametrize("bias", [False, True])
def test_closed_form_equals_lstsq_on_the_stacked_system(tokens: int, bias: bool) -> None:
    """Catches a wrong normal equation (e.g. G[S, S] W_S instead of G[S, :] W, a penalty on the
    bias, the uncentred Gram with a bias, lam from the whole diagonal instead of the kept)."""
    z, w, keep = problem(tokens, k=12, seed=tokens)
    stats = stats_of(z)
    got = refit_down(stats.gram, w, keep, 0.3, sums=stats.sums, tokens=stats.tokens, bias=bias)
    want_w, want_b = lstsq_oracle(z, w, keep, 0.3, bias)
    torch.testing.assert_close(got.weight, want_w, rtol=1e-8, atol=1e-9)
    if bias:
        assert got.bias is not None and want_b is not None
        torch.testing.assert_close(got.bias, want_b, rtol=1e-8, atol=1e-9)
    else:
        assert got.bias is None


def test_refit_reduces_the_prompt_error_below_the_plain_slice() -> None:
    """Catches a sign error in the correction (W_S - ... instead of W_S + ...)."""
    z, w, keep = problem(40, k=12)
    stats = stats_of(z)
    new = refit_down(stats.gram, w, keep, 0.1).weight
    y = z @ w.T
    err_refit = float((z[:, keep] @ new.T - y).square().sum())
    err_slice = float((z[:, keep] @ w[:, keep].T - y).square().sum())
    assert err_refit < 0.8 * err_slice


def test_huge_alpha_gives_back_the_plain_slice() -> None:
    """Catches a penalty that pulls towards zero (``lam ||W'||^2``) instead of towards W_S."""
    z, w, keep = problem(30, k=9)
    stats = stats_of(z)
    got = refit_down(stats.gram, w, keep, 1e12).weight
    torch.testing.assert_close(got, w[:, keep], rtol=0, atol=1e-9)


def test_keep_order_is_followed_and_keeping_everything_is_exact() -> None:
    """Catches columns returned in sorted order whatever ``keep``'s order, and a refit that
    changes the weight when nothing is dropped."""
    z, w, keep = problem(30, k=9)
    stats = stats_of(z)
    forward = refit_down(stats.gram, w, keep, 0.5).weight
    backward = refit_down(stats.gram, w, keep.flip(0), 0.5).weight
    torch.testing.assert_close(backward, forward.flip(1), rtol=1e-10, atol=1e-12)
    everything = refit_down(stats.gram, w, torch.arange(D_FF), 0.5)
    assert torch.equal(everything.weight, w)


def test_bias_is_the_mean_residual() -> None:
    """Catches a bias that ignores the refitted weights (mean of Y - Z_S W_S^T) or has the
    wrong sign."""
    z, w, keep = problem(50, k=10)
    stats = stats_of(z)
    got = refit_down(stats.gram, w, keep, 1.0, sums=stats.sums, tokens=stats.tokens, bias=True)
    assert got.bias is not None
    residual = z @ w.T - z[:, keep] @ got.weight.T
    torch.testing.assert_close(got.bias, residual.mean(0), rtol=1e-9, atol=1e-10)
    # With alpha -> inf the weights stay the slice and the bias is the dropped neurons' mean.
    frozen = refit_down(stats.gram, w, keep, 1e12, sums=stats.sums, tokens=stats.tokens, bias=True)
    dropped = torch.ones(D_FF, dtype=torch.bool)
    dropped[keep] = False
    assert frozen.bias is not None
    torch.testing.assert_close(
        frozen.bias, w[:, dropped] @ z[:, dropped].mean(0), rtol=1e-6, atol=1e-8
    )


def test_five_token_prompt_is_finite_and_moves_only_within_its_span() -> None:
    """Catches a solve that is singular or blows up for T << k (no ridge, or lam = 0)."""
    z, w, keep = problem(5, k=18)
    stats = stats_of(z)
    for bias in (False, True):
        got = refit_down(stats.gram, w, keep, 1.0, sums=stats.sums, tokens=5, bias=bias)
        assert torch.isfinite(got.weight).all()
        change = got.weight - w[:, keep]  # rows lie in the span of the 5 kept-activation rows
        basis = z[:, keep] - (z[:, keep].mean(0) if bias else 0)
        proj = change @ torch.linalg.pinv(basis) @ basis
        torch.testing.assert_close(proj, change, rtol=1e-7, atol=1e-9)


def test_float32_inputs_and_a_zero_prompt() -> None:
    """Catches dtype leaks (float64 weights returned for a float32 model) and a division by
    a zero lambda when every kept neuron is silent."""
    z, w, keep = problem(30, k=9)
    stats = stats_of(z)
    got = refit_down(stats.gram.float(), w.float(), keep, 1.0)
    assert got.weight.dtype == torch.float32
    silent = GramStats.zeros(D_FF, dtype=torch.float64)
    silent.add(torch.zeros(4, D_FF))
    same = refit_down(silent.gram, w, keep, 1.0, sums=silent.sums, tokens=4, bias=True)
    assert torch.equal(same.weight, w[:, keep])
    assert same.bias is not None and torch.equal(same.bias, torch.zeros(D_OUT, dtype=w.dtype))


def test_gram_stats_accumulate_like_one_product() -> None:
    """Catches an accumulator that overwrites instead of adding chunk by chunk."""
    z, _, _ = problem(33, k=5)
    stats = stats_of(z)
    torch.testing.assert_close(stats.gram, z.T @ z)
    torch.testing.assert_close(stats.sums, z.sum(0))
    assert stats.tokens == 33


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--compensate 'ridge'"):
        check_method("ridge")
    for alpha in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--alpha"):
            check_alpha(alpha)


@pytest.mark.parametrize("method", ["refit", "refit-bias"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ppl_refit_equals_a_refitted_sliced_model_continuing_the_full_cache(
    model_type: str, method: str
) -> None:
    """``griffin ppl``'s per-window refit (dropped activations imputed inside one masked
    forward) against an independent path: the full model's KV cache of the prompt, then the
    model sliced to the prompt's experts with :func:`refit_down` weights (and bias) on the
    rest. Catches a refit fitted on the wrong positions (scored ones, the whole window), a
    wrong sign or bias in the imputation, and a Conv1D weight used untransposed."""
    import copy

    from griffin_export import prune_model, select_experts, spec_for
    from griffin_export.activations import capture_down_inputs
    from griffin_export.evaluate import Setting, evaluate, make_windows
    from griffin_export.scoring import keep_count

    from tiny import random_ids, tiny_model

    length, prompt = 48, 20
    model, spec = tiny_model(model_type), spec_for(model_type)
    ids = random_ids(length, seed=9)
    setting = Setting("g", "griffin", k=[keep_count(37, 0.5)] * 3, compensate=method, alpha=0.3)
    report = evaluate(
        [(model, spec, setting)],
        make_windows(ids, length, min_score_from=prompt),
        dataset="t",
        protocol="griffin",
        prompt_len=prompt,
    )

    grams: dict[int, GramStats] = {}

    def sink(layer: int, z: torch.Tensor) -> None:
        grams[layer] = GramStats.zeros(z.shape[-1], dtype=torch.float64)
        grams[layer].add(z[0])

    with torch.no_grad(), capture_down_inputs(spec, model, sink):
        model(input_ids=ids[None, :prompt])
    keep = select_experts(spec, model, [ids[:prompt]], ratio=0.5).keep
    pruned = copy.deepcopy(model)
    prune_model(spec, pruned, keep)
    for layer, block in enumerate(spec.blocks(pruned)):
        full_down = spec.down_module(spec.blocks(model)[layer])
        down = spec.down_module(block)
        weight = full_down.weight.detach()
        stats = grams[layer]
        refit = refit_down(
            stats.gram,
            weight.T if spec.transposed else weight,
            keep[layer],
            0.3,
            sums=stats.sums,
            tokens=stats.tokens,
            bias=method == "refit-bias",
        )
        down.weight.data = refit.weight.T.contiguous() if spec.transposed else refit.weight
        if refit.bias is not None:
            base = down.bias.data if down.bias is not None else 0
            down.bias = torch.nn.Parameter(base + refit.bias)
    with torch.no_grad():
        prefix = model(input_ids=ids[None, :prompt], use_cache=True)
        rest = pruned(input_ids=ids[None, prompt:], cache=prefix.past_key_values, use_cache=True)
    logits = torch.cat([prefix.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[prompt:], reduction="sum")
    plain = evaluate(
        [(model, spec, Setting("g", "griffin", k=[keep_count(37, 0.5)] * 3))],
        make_windows(ids, length, min_score_from=prompt),
        dataset="t",
        protocol="griffin",
        prompt_len=prompt,
    )
    assert report.rows[0].nll == pytest.approx(float(nll), rel=1e-4)
    assert abs(report.rows[0].nll - plain.rows[0].nll) > 1e-3  # the refit changed something
