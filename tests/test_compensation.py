"""Compensation (issue 16): the closed-form ridge refit against independent oracles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from griffin_export.core.compensation import (
    DEFAULT_REFIT_ON_REFRESH,
    GramStats,
    apply_regression,
    check_alpha,
    check_method,
    default_alpha,
    refit_down,
)
from griffin_export.errors import UsageError
from griffin_export.formats.manifest import EXPERTS_FILE

D_FF, D_OUT = 23, 11


def problem(tokens: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, D_FF, generator=gen, dtype=torch.float64)
    z[:, 3] += 2.0  # a neuron with a non-zero mean, so the bias has something to carry
    w = torch.randn(D_OUT, D_FF, generator=gen, dtype=torch.float64)
    keep = torch.sort(torch.randperm(D_FF, generator=gen)[:k]).values
    return z, w, keep


def stats_of(z: torch.Tensor, rows_limit: int = 0) -> GramStats:
    """Float64 statistics (``rows_limit=0``: the Gram matrix from the first token on)."""
    stats = GramStats.zeros(z.shape[1], dtype=torch.float64, rows_limit=rows_limit)
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
    """Both solves (``k x k`` from the Gram matrix, ``T x T`` from the rows). Catches a wrong
    normal equation (e.g. G[S, S] W_S instead of G[S, :] W, a penalty on the bias, the
    uncentred Gram with a bias, lam from the whole diagonal instead of the kept) and a wrong
    push-through (rows not centred, lam scaled by T instead of k)."""
    z, w, keep = problem(tokens, k=12, seed=tokens)
    stats = stats_of(z)
    assert stats.gram is not None
    got = refit_down(stats.gram, w, keep, 0.3, sums=stats.sums, tokens=stats.tokens, bias=bias)
    rows = stats_of(z, rows_limit=10**6)  # kept as rows: the T x T (push-through) solve
    assert rows.gram is None
    from_rows = apply_regression(rows.regression(keep, 0.3, bias), w)
    want_w, want_b = lstsq_oracle(z, w, keep, 0.3, bias)
    for refit in (got, from_rows):
        torch.testing.assert_close(refit.weight, want_w, rtol=1e-8, atol=1e-9)
        if bias:
            assert refit.bias is not None and want_b is not None
            torch.testing.assert_close(refit.bias, want_b, rtol=1e-8, atol=1e-9)
        else:
            assert refit.bias is None


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
    silent = GramStats.zeros(D_FF, dtype=torch.float64, rows_limit=0)
    silent.add(torch.zeros(4, D_FF))
    same = refit_down(silent.matrix(), w, keep, 1.0, sums=silent.sums, tokens=4, bias=True)
    assert torch.equal(same.weight, w[:, keep])
    assert same.bias is not None and torch.equal(same.bias, torch.zeros(D_OUT, dtype=w.dtype))


def test_overflowed_activations_give_the_plain_slice() -> None:
    """Activations that overflowed the model's dtype (inf/nan in the statistics) leave nothing
    to fit: the plain slice and a zero bias, on both solve paths. Catches a refit that spreads
    nan into every kept column (or crashes in the solver) instead."""
    z, w, keep = problem(30, k=9)
    z[3, 0] = float("inf")
    for rows_limit in (0, 10**6):
        stats = stats_of(z, rows_limit=rows_limit)
        refit = apply_regression(stats.regression(keep, 1.0, True), w)
        assert torch.equal(refit.weight, w[:, keep])
        assert refit.bias is not None and torch.equal(refit.bias, torch.zeros(D_OUT).double())


def test_gram_stats_accumulate_like_one_product() -> None:
    """Catches an accumulator that overwrites instead of adding chunk by chunk, and rows lost
    when the statistics switch from rows to the Gram matrix past ``rows_limit``."""
    z, _, _ = problem(33, k=5)
    stats = stats_of(z)
    torch.testing.assert_close(stats.matrix(), z.T @ z)
    switched = stats_of(z, rows_limit=10)  # rows for the first chunks, then the Gram matrix
    assert switched.gram is not None and not switched.rows
    torch.testing.assert_close(switched.matrix(), z.T @ z)
    torch.testing.assert_close(stats.sums, z.sum(0))
    assert stats.tokens == 33


def test_default_alpha_by_keep_ratio() -> None:
    """The measured recipe: alpha 1 up to keep 0.75, 10 from 0.8 up. Catches the two swapped
    or the threshold moved past the ratios it was measured at."""
    assert [default_alpha(r) for r in (0.25, 0.5, 0.75, 0.79)] == [1.0] * 4
    assert [default_alpha(r) for r in (0.8, 0.9, 1.0)] == [10.0] * 3


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
    from griffin_export.core.activations import capture_down_inputs
    from griffin_export.core.scoring import keep_count
    from griffin_export.evaluation.ppl import evaluate
    from griffin_export.evaluation.protocols import Setting, make_windows

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
            stats.matrix(),
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


def _dominated(length: int, sets: list[tuple[int, torch.Tensor]], seed: int = 0) -> torch.Tensor:
    """``[1, length, D_FF]`` float64 noise where, from each ``(start, neurons)`` on, the
    listed neurons are large: GRIFFIN's top-k over any stretch of those positions is them."""
    gen = torch.Generator().manual_seed(seed)
    z = 0.05 * torch.randn(1, length, D_FF, generator=gen, dtype=torch.float64)
    for start, neurons in sets:
        z[0, start:, :] = 0.05 * torch.randn(
            length - start, D_FF, generator=gen, dtype=torch.float64
        )
        z[0, start:, neurons] += 3.0 + torch.rand(length - start, neurons.numel(), generator=gen)
    return z


def _ridge_prediction(look: torch.Tensor, seg: torch.Tensor, keep: torch.Tensor, alpha: float):
    """The dropped neurons predicted by a ridge fit on ``look``, in float64 by
    ``torch.linalg.solve`` on the normal equations (the definition, not the library)."""
    dropped = torch.tensor([j for j in range(D_FF) if j not in set(keep.tolist())])
    zs, zd = look[:, keep], look[:, dropped]
    lam = alpha * float((zs * zs).sum(0).mean())
    coef = torch.linalg.solve(zs.T @ zs + lam * torch.eye(keep.numel(), dtype=zs.dtype), zs.T @ zd)
    return dropped, seg[:, keep] @ coef


def test_ppl_refit_off_at_refresh_refits_the_prompt_only_and_slices_plain_after_a_change() -> None:
    """``griffin ppl``'s refresh protocol with ``refit_on_refresh=False`` (the runtime's refit
    off): the first segment runs the ridge fit on the prompt part; while the experts stay the
    same set, later segments keep that fit; once they change, the dropped neurons are zeroed
    (the plain slice) for the rest of the window, even when the next segment re-selects the
    same new set. Oracle: the ridge solved on the normal equations in float64 and the known
    dominant neurons. Catches refitting every segment anyway (the refit-on path), dropping
    the prompt's fit when nothing changed, and mixing the old fit with the new set."""
    from griffin_export.evaluation.protocols import griffin_refit_input, griffin_segments

    first, second = torch.arange(0, 16, 2), torch.arange(1, 17, 2)  # k = 8 each
    segments = griffin_segments(20, 44, 8, 8)  # looks [12,20) [20,28) [28,36), scored 20..43
    alpha = 0.5
    same = _dominated(44, [(0, first)])
    off = griffin_refit_input(same, 8, segments, "refit", alpha, refit_on_refresh=False)
    on = griffin_refit_input(same, 8, segments, "refit", alpha)
    dropped, want = _ridge_prediction(same[0, 12:20], same[0, 20:44], first, alpha)
    torch.testing.assert_close(off[0, 20:44][:, dropped], want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(on[0, 28:44], off[0, 28:44])  # refit on refits each segment
    moved = _dominated(44, [(0, first), (20, second)])
    off = griffin_refit_input(moved, 8, segments, "refit", alpha, refit_on_refresh=False)
    dropped, want = _ridge_prediction(moved[0, 12:20], moved[0, 20:28], first, alpha)
    torch.testing.assert_close(off[0, 20:28][:, dropped], want, rtol=1e-4, atol=1e-6)
    plain = moved.clone()
    plain[0, :, [j for j in range(D_FF) if j not in set(second.tolist())]] = 0
    assert torch.equal(off[0, 28:44], plain[0, 28:44])
    assert torch.equal(off[0, :20], moved[0, :20])  # the prompt part runs full


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ([], DEFAULT_REFIT_ON_REFRESH),
        (["--refit-on-refresh"], True),
        (["--no-refit-on-refresh"], False),
    ],
)
def test_cli_ppl_refit_on_refresh_flag(
    flags: list[str], want: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``griffin ppl --no-refit-on-refresh`` reaches :func:`perplexity` as False, and the
    default is the library's. Catches a flag wired to nothing or inverted."""
    from typer.testing import CliRunner

    import griffin_cli.ppl
    from griffin_cli.main import app

    seen: dict[str, object] = {}

    def fake(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        raise UsageError("stop here")

    monkeypatch.setattr(griffin_cli.ppl, "perplexity", fake)
    result = CliRunner().invoke(app, ["ppl", "--refresh", "64", *flags])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["refit_on_refresh"] is want


# -- export -------------------------------------------------------------------------------------

PROMPTS = ["Flocking neurons carry the activation.", "A second prompt, pooled with the first."]


def _reference_refit_model(model_type: str, prompts: list[str], ratio: float, method: str):
    """The tiny model pruned to the prompts' experts with its down projections refitted by
    :func:`refit_down` from Gram matrices built here from captured activations (float64), in
    memory: the independent side of the export tests."""
    import copy

    from griffin_export import prune_model, select_experts, spec_for
    from griffin_export.core.activations import capture_down_inputs

    from tiny import char_tokenizer, tiny_model

    model, spec = tiny_model(model_type), spec_for(model_type)
    tok = char_tokenizer()
    ids = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
    zs: dict[int, list[torch.Tensor]] = {}
    with (
        torch.no_grad(),
        capture_down_inputs(spec, model, lambda i, z: zs.setdefault(i, []).append(z[0].double())),
    ):
        for one in ids:
            model(input_ids=one[None])
    keep = select_experts(spec, model, ids, ratio=ratio).keep
    pruned = copy.deepcopy(model)
    prune_model(spec, pruned, keep)
    for layer, block in enumerate(spec.blocks(pruned)):
        z = torch.cat(zs[layer])
        weight = spec.down_module(spec.blocks(model)[layer]).weight.detach()
        refit = refit_down(
            z.T @ z,
            weight.T.double() if spec.transposed else weight.double(),
            keep[layer],
            1.0,
            sums=z.sum(0),
            tokens=z.shape[0],
            bias=method == "refit-bias",
        )
        down = spec.down_module(block)
        new = refit.weight.float()
        down.weight.data = new.T.contiguous() if spec.transposed else new
        if refit.bias is not None:
            down.bias.data = down.bias.data + refit.bias.float()
    return model, pruned, keep


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("llama", "refit"), ("gpt2", "refit"), ("phi3", "refit"), ("gpt2", "refit-bias")],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_refitted_export_loads_stock_and_equals_the_in_memory_refit(
    model_type: str, method: str, streaming: bool, tmp_path: Path
) -> None:
    """The export (streaming and in-memory) loads with stock ``from_pretrained`` and its
    logits equal the pruned model refitted here in float64. Catches an export that writes the
    plain slice, refits from the wrong Gram (one prompt only, the wrong layer), or puts a
    Conv1D weight or the fused layout the wrong way round."""
    from transformers import AutoModelForCausalLM

    from griffin_export import export
    from griffin_export.formats.manifest import read_manifest

    from tiny import random_ids, save_tiny

    src = save_tiny(model_type, tmp_path / "src")
    out = tmp_path / "out"
    result = export(
        str(src), PROMPTS, 0.5, out=out, compensate=method, alpha=1.0, streaming=streaming
    )
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    _, reference, keep = _reference_refit_model(model_type, PROMPTS, 0.5, method)
    with safe_open(str(out / EXPERTS_FILE), "pt") as handle:
        recorded = [handle.get_tensor(f"layer.{i}").long() for i in range(len(keep))]
    assert all(torch.equal(a, b) for a, b in zip(recorded, keep, strict=True))
    ids = random_ids(23, seed=5)
    with torch.no_grad():
        got = exported(input_ids=ids[None]).logits
        want = reference(input_ids=ids[None]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert read_manifest(out).compensation == {
        "method": method,
        "alpha": 1.0,
        "bias": method == "refit-bias",
    }
    assert result.compensation == read_manifest(out).compensation


@pytest.mark.parametrize(
    ("model_type", "method"), [("gpt2", "refit-bias"), ("opt", "refit-bias"), ("gemma", "refit")]
)
def test_streaming_refit_equals_in_memory_bit_for_bit(
    model_type: str, method: str, tmp_path: Path
) -> None:
    """Catches a streaming refit that differs from the in-memory one in any bit (Gram
    accumulated in another order or dtype, the bias added in another precision, the refit
    computed from the already sliced weight)."""
    from test_streaming import PROMPTS as TWO_PROMPTS
    from test_streaming import assert_same_export

    from tiny import tiny_model

    assert_same_export(tmp_path, tiny_model(model_type), True, TWO_PROMPTS, compensate=method)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compensate_none_writes_the_plain_slices_byte_for_byte(
    model_type: str, tmp_path: Path
) -> None:
    """``--compensate none`` is the export as it was before compensation: the in-memory
    weights file is byte-identical to the original pruned and saved by ``save_pretrained``,
    the streamed one holds bit-identical tensors, and the manifest has no compensation
    entry. Catches a refit (or any value change) leaking into ``none``, and a manifest that
    records ``none``."""
    import copy
    import json

    from griffin_export import export, prune_model, select_experts, spec_for
    from griffin_export.formats.manifest import MANIFEST

    from tiny import char_tokenizer, save_tiny, tiny_model

    src = save_tiny(model_type, tmp_path / "src")
    export(str(src), PROMPTS, 0.5, out=tmp_path / "none", compensate="none", streaming=False)
    export(str(src), PROMPTS, 0.5, out=tmp_path / "lean", compensate="none", streaming=True)
    model, spec = tiny_model(model_type), spec_for(model_type)
    tok = char_tokenizer()
    ids = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS]
    pruned = copy.deepcopy(model)
    prune_model(spec, pruned, select_experts(spec, model, ids, ratio=0.5).keep)
    pruned.save_pretrained(tmp_path / "plain")
    got = (tmp_path / "none" / "model.safetensors").read_bytes()
    assert got == (tmp_path / "plain" / "model.safetensors").read_bytes()
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    lean = load_file(tmp_path / "lean" / "model.safetensors")  # same tensors, own key order
    assert plain.keys() == lean.keys()
    assert all(plain[k].dtype == lean[k].dtype and torch.equal(plain[k], lean[k]) for k in plain)
    assert "compensation" not in json.loads((tmp_path / "none" / MANIFEST).read_text())
    refit = tmp_path / "refit"
    export(str(src), PROMPTS, 0.5, out=refit, streaming=True)  # the default refits
    assert (refit / "model.safetensors").read_bytes() != got


def test_refit_at_ratio_one_is_the_original_and_bias_needs_a_stock_bias(tmp_path: Path) -> None:
    """Keeping every neuron leaves nothing to refit: the export's logits equal the
    original's exactly. ``refit-bias`` on Llama (no down bias in its stock config) is refused
    with the fix. Catches a refit that perturbs weights when nothing is dropped, and a silent
    config change."""
    from transformers import AutoModelForCausalLM

    from griffin_export import export
    from griffin_export.formats.manifest import read_manifest

    from tiny import random_ids, save_tiny

    src = save_tiny("llama", tmp_path / "src")
    export(str(src), PROMPTS, 1.0, out=tmp_path / "all")
    assert read_manifest(tmp_path / "all").compensation == {
        "method": "refit",
        "alpha": 10.0,  # the default from keep 0.8 up
        "bias": False,
    }
    ids = random_ids(17, seed=2)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "all")(input_ids=ids[None]).logits
        want = AutoModelForCausalLM.from_pretrained(src)(input_ids=ids[None]).logits
    assert torch.equal(got, want)
    with pytest.raises(UsageError, match="--compensate refit-bias needs a down-projection bias"):
        export(str(src), PROMPTS, 0.5, out=tmp_path / "b", compensate="refit-bias")


def test_verify_a_refitted_export_against_its_original(tmp_path: Path) -> None:
    """A refitted export verifies clean against its original (the refitted down weights are
    exempt from the slice comparison, nothing else is); a changed gate row or embedding is
    still caught. Catches a verify that rejects every refitted export, or one that stops
    checking the tensors compensation does not touch."""
    from safetensors.torch import save_file

    from griffin_export import export
    from griffin_export.formats.verify import verify_export

    from tiny import save_tiny

    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), PROMPTS, 0.5, out=out)
    assert verify_export(out, str(src)).problems == []
    weights = out / "model.safetensors"
    for key in ("model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        tensors = load_file(weights)
        tensors[key][0, 0] += 1.0
        save_file(tensors, weights, {"format": "pt"})
        problems = verify_export(out, str(src), hash_files=False).problems
        assert any(p.startswith(key) for p in problems), problems


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_runtime_refits_a_compensated_export_at_each_refresh_and_resets_to_it(
    model_type: str, tmp_path: Path
) -> None:
    """On a refitted export, a refresh refits the live down projection on the ring window,
    like the export refits on the prompt: the live weights equal :func:`refit_down` computed
    in float64 from the window's activations, which the *original* model's own MLP computes
    here. ``reset`` puts the export's refitted weights back bit for bit. Catches a refresh
    that copies plain columns next to refitted ones (the pre-compensation runtime), a refit
    on the wrong rows or in the wrong slot order, and a reset that restores plain columns."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from griffin_export import export, spec_for
    from griffin_export.runtime.refresh import GriffinRuntime

    from tiny import save_tiny

    src = save_tiny(model_type, tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), PROMPTS, 0.5, out=out, alpha=0.5)
    runtime = GriffinRuntime.from_export(out)
    runtime.generate("Rain and rivers", max_new_tokens=12, refresh_every=5, window=9)
    with torch.inference_mode():  # as generate runs it
        runtime.refresh(99)  # the rings still hold the last 9 MLP inputs
    spec = spec_for(model_type)
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    for layer, (live, full) in enumerate(
        zip(spec.blocks(runtime.model), spec.blocks(original), strict=True)
    ):
        x = runtime._rings[layer].contents()
        captured: list[torch.Tensor] = []
        down = spec.down_module(full)
        handle = down.register_forward_pre_hook(
            lambda _m, a, captured=captured: captured.append(a[0])
        )
        with torch.no_grad():
            spec.mlp_module(full)(x[None])
        handle.remove()
        z = captured[0][0].double()
        weight = down.weight.detach().double()
        want = refit_down(
            z.T @ z, weight.T if spec.transposed else weight, runtime.slots[layer], 0.5
        ).weight
        got = spec.down_module(live).weight.detach().double()
        torch.testing.assert_close(got.T if spec.transposed else got, want, rtol=1e-4, atol=1e-5)
    runtime.reset()
    stored = load_file(out / "model.safetensors")
    for layer, block in enumerate(spec.blocks(runtime.model)):
        key = spec.param_name(layer, "down")
        assert torch.equal(spec.down_module(block).weight.detach(), stored[key])


@pytest.mark.slow
def test_embedded_model_refit_streaming_equals_in_memory_and_verifies(tmp_path: Path) -> None:
    """The default export of the real model (refit) is bit-identical streaming and in memory,
    loads with stock ``from_pretrained``, verifies against its original, and its down
    projections differ from the plain slice (the refit happened) while gate/up do not.
    Catches a refit that only works on the tiny models' sizes (rows vs Gram path: 140 prompt
    tokens < d_ff/2 here), or one that leaks into tensors it must not touch."""
    from transformers import AutoModelForCausalLM

    from griffin_export import export
    from griffin_export.formats.verify import verify_export
    from griffin_export.storage.sources import resolve_source

    prompt = (Path(__file__).parents[1] / "examples" / "prompt.txt").read_text(encoding="utf-8")
    lean = export("smollm2-135m", [prompt], 0.5, out=tmp_path / "lean", streaming=True)
    export("smollm2-135m", [prompt], 0.5, out=tmp_path / "full", streaming=False)
    assert lean.compensation == {"method": "refit", "alpha": 1.0, "bias": False}
    a = load_file(tmp_path / "lean" / "model.safetensors")
    b = load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source = resolve_source("smollm2-135m").directory
    assert verify_export(tmp_path / "lean", str(source)).problems == []
    original = load_file(source / "model.safetensors")
    with safe_open(str(tmp_path / "lean" / EXPERTS_FILE), "pt") as handle:
        keep = handle.get_tensor("layer.3").long()
    down, up = "model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(a[up], original[up][keep])
    assert not torch.equal(a[down], original[down][:, keep])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lean")
    assert model.config.intermediate_size == 768
