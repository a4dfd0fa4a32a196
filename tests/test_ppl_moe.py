"""`griffin ppl` on mixtures of experts: the griffin protocol against a plain recomputation
(choose on the prompt part with ``select_moe``, slice a copy with ``prune_moe_model``, continue
the full model's KV cache with it), the static protocol on an export against the export's own
loss, and the CLI's ``--experts``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_moe import save_tiny_moe as tiny_moe_files
from tiny_moe import tiny_moe_config, tiny_moe_model
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.core.architectures import MOE_ARCHITECTURES
from griffin_export.core.compensation import Compensation
from griffin_export.core.moe_selection import plan_moe_sizes, prune_moe_model, select_moe
from griffin_export.errors import UsageError
from griffin_export.evaluation.ppl import evaluate, moe_griffin_settings, perplexity
from griffin_export.evaluation.protocols import Setting, make_windows

from tiny import char_tokenizer, random_ids

L, P = 64, 40

#: mixtral (every layer routed) and qwen2_moe (a dense layer 0, a gated shared expert)
MOE_TYPES = ["mixtral", "qwen2_moe"]
#: weights large enough that dropping experts moves the loss of the tiny models
INIT = 0.3


def tiny_moe(model_type: str) -> Any:
    return tiny_moe_model(model_type, initializer_range=INIT)


def save_tiny_moe(model_type: str, directory: Path) -> Path:
    return tiny_moe_files(model_type, directory, initializer_range=INIT)


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def recomputed_nll(model: Any, model_type: str, ids: torch.Tensor, method: str) -> float:
    """The oracle for one window: ``select_moe`` on its first P tokens (refitting a copy of
    the model), ``prune_moe_model`` on that copy, then the full model's KV cache of the first
    P tokens continued by the pruned copy; summed NLL of positions P.."""
    spec = spec_for(model_type)
    pruned = copy.deepcopy(model)
    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    chosen = select_moe(spec, pruned, [ids[:P]], sizes, compensation=Compensation(method, 0.7))
    prune_moe_model(spec, pruned, chosen)
    with torch.no_grad():
        prefix = model(input_ids=ids[None, :P], use_cache=True)
        rest = pruned(input_ids=ids[None, P:], cache=prefix.past_key_values, use_cache=True)
    logits = torch.cat([prefix.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0]
    return nll_of(logits, ids[P:])


def full_nll(model: Any, ids: torch.Tensor, score_from: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return nll_of(logits[score_from - 1 : -1], ids[score_from:])


@pytest.mark.parametrize("method", ["none", "refit"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_griffin_windows_equal_choosing_slicing_and_continuing(
    model_type: str, method: str
) -> None:
    """Each window of the griffin protocol equals its plain recomputation (choose on the
    prompt part, slice a copy, continue the full model's cache with it), with two windows in
    one batch. Catches: positions < P run pruned (keys and values from the pruned model);
    removed experts zeroed after routing instead of taken out of the router (the kept
    experts' weights would not be renormalised, other experts not promoted into the top-k);
    one batch row's experts used for the other; refits fitted elsewhere than the prompt's
    routed tokens, or not applied; and refits written into the full model (checked apart)."""
    model, spec = tiny_moe(model_type), spec_for(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ws = make_windows(random_ids(2 * L, seed=3), L, min_score_from=P)
    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    setting = Setting("g", "griffin", compensate=method, alpha=0.7, moe=sizes)
    report = evaluate(
        [(model, spec, Setting("full", "full")), (model, spec, setting)],
        ws,
        dataset="t",
        protocol="griffin",
        prompt_len=P,
        batch_size=2,
    )
    expected = sum(recomputed_nll(model, model_type, w.ids, method) for w in ws)
    full = sum(full_nll(model, w.ids, P) for w in ws)
    assert report.tokens_scored == 2 * (L - P)
    assert report.rows[0].nll == pytest.approx(full, rel=1e-6)
    assert report.rows[1].nll == pytest.approx(expected, rel=1e-6)
    assert abs(expected - full) > 1e-3 * abs(full)  # pruning matters at this tolerance
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["none", "refit"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_all_experts_all_neurons_equal_the_full_model(model_type: str, method: str) -> None:
    """``--experts 1 --ratio 1`` reproduces the full model's loss bit for bit. Catches a
    pruned layer that is not the model's own computation (a wrong gate/up row order, a router
    that lost its bias or its experts' order, a shared expert or dense layer left out, a
    refit that moves weights nothing was dropped from), and the pruned layer run on other
    token groups than the full one (last bits apart, so ``eval --check`` would fail)."""
    model, spec = tiny_moe(model_type), spec_for(model_type)
    settings = moe_griffin_settings(spec, model, [1.0], 1.0, method)
    report = evaluate(
        [(model, spec, s) for s in settings],
        make_windows(random_ids(2 * L, seed=5), L, min_score_from=P),
        dataset="t",
        protocol="griffin",
        prompt_len=P,
    )
    assert [r.name for r in report.rows] == ["full", "griffin r=1 experts=1"]
    assert report.rows[1].nll == report.rows[0].nll


def corpus_file(tmp_path: Path, n: int) -> Path:
    text = (
        "Rivers run to the sea; the sea comes back as rain over the hills, and the hills "
        "send it down again. "
    )
    path = tmp_path / "corpus.txt"
    path.write_text((text * (n // len(text) + 1))[:n])
    return path


def window_ids(path: Path, n_windows: int) -> list[torch.Tensor]:
    """The corpus's first windows of L tokens, one token per character (char tokenizer)."""
    ids = torch.tensor(char_tokenizer()(path.read_text())["input_ids"])
    return [ids[i * L : (i + 1) * L] for i in range(n_windows)]


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_static_on_an_moe_export_equals_its_own_loss(model_type: str, tmp_path: Path) -> None:
    """``--protocol static`` on an MoE export: the export's row is the loss of the export as
    stock ``from_pretrained`` loads it, the full row the original's, on the same windows.
    Catches an export row computed with the original's FF tensors (the shared-tensor load
    keeping the full experts) or on other tokens."""
    from transformers import AutoModelForCausalLM

    src = save_tiny_moe(model_type, tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), ["the sea comes back as rain " * 3], 0.5, experts=0.5, out=out)
    corpus = corpus_file(tmp_path, 3 * L)
    report = perplexity(str(out), dataset=str(corpus), seq_len=L, max_windows=3)
    assert report.protocol == "static"
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    ws = window_ids(corpus, 3)
    rows = {r.name: r.nll for r in report.rows}
    assert rows["full"] == pytest.approx(sum(full_nll(original, w, 1) for w in ws), rel=1e-6)
    assert rows["out"] == pytest.approx(sum(full_nll(exported, w, 1) for w in ws), rel=1e-6)
    assert rows["out"] != pytest.approx(rows["full"], rel=1e-3)


def test_griffin_on_an_moe_export_replays_its_recipe(tmp_path: Path) -> None:
    """``--protocol griffin`` on an MoE export runs the manifest's kept sizes and refit on its
    original: the same losses as the full model with the export's ratio and experts. Catches
    a replay that ignores the manifest's sizes or compensation."""
    src = save_tiny_moe("qwen2_moe", tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), ["the sea comes back as rain " * 3], 0.5, experts=0.5, out=out)
    corpus = corpus_file(tmp_path, 2 * L)
    common: dict[str, Any] = dict(dataset=str(corpus), seq_len=L, prompt_len=P, max_windows=2)
    replay = perplexity(str(out), protocol="griffin", **common)
    direct = perplexity(str(src), ratios=[0.5], experts=0.5, **common)
    assert [r.nll for r in replay.rows] == [r.nll for r in direct.rows]
    assert replay.rows[1].name == "griffin out"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(refreshes=[8]), "--refresh"),
        (dict(window=8), "--window"),
        (dict(baselines=["random"]), "--baselines"),
        (dict(budgets=["protect"]), "--budget"),
        (dict(compensate="refit-bias"), "refit-bias"),
        (dict(experts=0.5, protocol="static"), "--experts"),
        (dict(experts=1.5), "--experts"),
    ],
)
def test_options_an_moe_run_does_not_take_are_refused(
    options: dict[str, Any], named: str, tmp_path: Path
) -> None:
    """Each refused option is named in one line, before any window is scored."""
    src = save_tiny_moe("mixtral", tmp_path / "src")
    corpus = corpus_file(tmp_path, 2 * L)
    with pytest.raises(UsageError, match=named):
        perplexity(str(src), dataset=str(corpus), seq_len=L, prompt_len=P, **options)


def test_experts_on_a_dense_model_is_refused(tmp_path: Path) -> None:
    from tiny import save_tiny

    src = save_tiny("llama", tmp_path / "src")
    corpus = corpus_file(tmp_path, 2 * L)
    with pytest.raises(UsageError, match="dense model"):
        perplexity(str(src), dataset=str(corpus), seq_len=L, prompt_len=P, experts=0.5)


def test_cli_ppl_experts(tmp_path: Path) -> None:
    """``griffin ppl --experts 0.5 --ratio 0.5 --json`` on an MoE directory: rows full and
    griffin, perplexities equal to the plain recomputation of every window. Catches a CLI
    that drops --experts (all experts kept) or --compensate."""
    src = save_tiny_moe("mixtral", tmp_path / "src")
    corpus = corpus_file(tmp_path, 2 * L)
    args = ["ppl", "--model", str(src), "--dataset", str(corpus), "--seq-len", str(L)]
    args += ["--prompt-len", str(P), "--ratio", "0.5", "--experts", "0.5", "--json"]
    args += ["--compensate", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["results"]] == ["full", "griffin r=0.5 experts=0.5"]
    assert data["params"]["experts"] == 0.5
    model = tiny_moe("mixtral")
    ws = window_ids(corpus, 2)
    expected = sum(recomputed_nll(model, "mixtral", w, "none") for w in ws)
    assert data["results"][1]["ppl"] == pytest.approx(math.exp(expected / (2 * (L - P))), 1e-6)

    refused = CliRunner().invoke(app, [*args, "--refresh", "8"])
    assert refused.exit_code == 2
    assert "--refresh" in refused.output


#: families whose full model gives a cached continuation other logits than one forward
#: (transformers' DeepSeek sparse-attention indexer: up to 6.6 apart on the tiny models), so
#: the cache-continuation oracle does not apply to them
CACHE_INCONSISTENT = {"axk2", "deepseek_v32", "glm_moe_dsa"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MOE_ARCHITECTURES))
def test_every_moe_family_equals_choosing_slicing_and_continuing(model_type: str) -> None:
    """The griffin protocol (experts 0.5, ratio 0.5, refit) on every MoE family's tiny model
    (tests/tiny_moe.py) equals the plain recomputation of its window. Catches a family whose
    FF output the hook cannot splice (gpt-oss returns a tuple), whose router keeps state the
    sliced copy does not (group routing, selection biases), or whose shared expert or dense
    layer the copy leaves full. Multi-head latent attention runs with as many key/value heads
    as heads: transformers' cache continuation of it fails otherwise."""
    if model_type in CACHE_INCONSISTENT:
        pytest.skip("the full model's cached continuation differs from one forward")
    mla = hasattr(tiny_moe_config(model_type), "kv_lora_rank")
    heads = {"num_key_value_heads": 4} if mla else {}
    model = tiny_moe_model(model_type, initializer_range=INIT, **heads)
    spec = spec_for(model_type)
    ws = make_windows(random_ids(L, seed=3), L, min_score_from=P)
    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    setting = Setting("g", "griffin", compensate="refit", alpha=0.7, moe=sizes)
    report = evaluate([(model, spec, setting)], ws, dataset="t", protocol="griffin", prompt_len=P)
    expected = recomputed_nll(model, model_type, ws[0].ids, "refit")
    assert report.rows[0].nll == pytest.approx(expected, rel=1e-6)
    assert abs(expected - full_nll(model, ws[0].ids, P)) > 1e-4 * expected
