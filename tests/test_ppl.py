"""`griffin ppl`: protocols against direct computations, and the CLI's JSON."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, prune_model, select_experts, spec_for
from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.scoring import keep_count
from griffin_export.errors import ModelLoadError, UsageError
from griffin_export.evaluation.corpora import load_corpus
from griffin_export.evaluation.ppl import evaluate, griffin_settings, magnitude_keep, random_keep
from griffin_export.evaluation.protocols import (
    Setting,
    griffin_mask,
    griffin_segments,
    make_windows,
)

from tiny import char_tokenizer, plain_top_k, random_ids, save_tiny, tiny_model

L, P = 48, 20


def windows(n: int = 3, seed: int = 0) -> list:
    return make_windows(random_ids(L * n, seed=seed), L, min_score_from=P)


def test_static_equals_hand_computed_cross_entropy() -> None:
    model = tiny_model("llama")
    spec = spec_for("llama")
    tokens = random_ids(3 * L)
    report = evaluate(
        [(model, spec, Setting("full", "full"))],
        make_windows(tokens, L),
        dataset="t",
        protocol="static",
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            ids = tokens[w * L : (w + 1) * L]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            for t in range(1, L):
                total -= float(logp[t - 1, ids[t]])
                count += 1
    assert report.tokens_scored == count == 3 * (L - 1)
    assert report.rows[0].ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_windows_score_each_token_once() -> None:
    ws = make_windows(torch.arange(100), 40, stride=20)
    assert [int(w.ids[0]) for w in ws] == [0, 20, 40, 60]
    assert [w.score_from for w in ws] == [1, 20, 20, 20]
    scored = [int(w.ids[i]) for w in ws for i in range(w.score_from, 40)]
    assert scored == list(range(1, 100))


def griffin_rows(model_type: str, **kwargs: object) -> dict[str, float]:
    model = tiny_model(model_type)
    spec = spec_for(model_type)
    settings = griffin_settings(spec, model, **kwargs)  # type: ignore[arg-type]
    report = evaluate(
        [(model, spec, s) for s in settings],
        windows(),
        dataset="t",
        protocol="griffin",
        prompt_len=P,
        batch_size=2,
    )
    assert report.tokens_scored == 3 * (L - P)
    return {r.name: r.nll for r in report.rows}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_ratio_one_equals_full(model_type: str) -> None:
    rows = griffin_rows(model_type, ratios=[1.0], refreshes=[0, 8], window=None, baselines=[])
    assert rows["griffin r=1"] == rows["full"]
    assert rows["griffin r=1 refresh=8"] == rows["full"]


def test_refresh_longer_than_the_scored_span_equals_no_refresh() -> None:
    rows = griffin_rows(
        "llama", ratios=[0.4], refreshes=[0, L - P, 10 * L], window=None, baselines=[]
    )
    assert rows[f"griffin r=0.4 refresh={L - P}"] == rows["griffin r=0.4"]
    assert rows[f"griffin r=0.4 refresh={10 * L}"] == rows["griffin r=0.4"]
    refreshed = griffin_rows("llama", ratios=[0.4], refreshes=[4], window=8, baselines=[])
    assert refreshed["griffin r=0.4 refresh=4"] != rows["griffin r=0.4"]


def test_first_segment_experts_equal_the_export_selection() -> None:
    model, spec = tiny_model("qwen2"), spec_for("qwen2")
    ids = random_ids(L, seed=4)
    k = keep_count(37, 0.5)
    captured: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture_down_inputs(spec, model, lambda i, z: captured.__setitem__(i, z)):
        model(input_ids=ids[None])
    segments = griffin_segments(P, L, refresh=0, window=P)  # the window is exactly the prompt
    chosen = select_experts(spec, model, [ids[:P]], ratio=0.5)
    for layer, z in captured.items():
        kept = griffin_mask(z, k, segments)[0, P].nonzero().flatten()
        assert torch.equal(kept, chosen.keep[layer])


def griffin_nll(model: Any, spec: Any, setting: Setting, ids: torch.Tensor) -> float:
    """Summed NLL of one window of ``ids`` under ppl's ``griffin`` protocol (prompt P)."""
    report = evaluate(
        [(model, spec, setting)],
        make_windows(ids, L, min_score_from=P),
        dataset="t",
        protocol="griffin",
        prompt_len=P,
    )
    return report.rows[0].nll


def continued_nll(full: Any, continuing: Any, ids: torch.Tensor) -> float:
    """The oracle: ``full`` on the first P tokens (its KV cache), ``continuing`` on the rest;
    summed NLL of positions P.. (the first from the prefix's last logits)."""
    with torch.no_grad():
        prefix = full(input_ids=ids[None, :P], use_cache=True)
        rest = continuing(input_ids=ids[None, P:], cache=prefix.past_key_values, use_cache=True)
    logits = torch.cat([prefix.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0]
    return float(torch.nn.functional.cross_entropy(logits, ids[P:], reduction="sum"))


def test_masked_forward_equals_a_sliced_model_continuing_the_full_models_cache() -> None:
    """The single masked forward is exact: full model on the prompt (its KV cache), then the
    model sliced to the prompt's experts on the rest."""
    model, spec = tiny_model("llama"), spec_for("llama")
    ids = random_ids(L, seed=9)
    setting = Setting("g", "griffin", k=[keep_count(37, 0.5)] * 3)

    pruned = copy.deepcopy(model)
    prune_model(spec, pruned, select_experts(spec, model, [ids[:P]], ratio=0.5).keep)
    assert griffin_nll(model, spec, setting, ids) == pytest.approx(
        continued_nll(model, pruned, ids), rel=1e-4
    )


@pytest.mark.parametrize(("model_type", "method"), [("llama", "refit"), ("gpt2", "refit-bias")])
def test_per_window_refit_equals_the_export_of_the_windows_prompt(
    model_type: str, method: str, tmp_path: Path
) -> None:
    """With compensation the oracle is ``griffin export`` itself: export from the window's
    prompt part (refitted there), then the full model's KV cache of the prompt continued by
    the export (stock ``from_pretrained``) on the rest. Catches a ppl refit fitted on other
    positions than the export's, or one that differs from the export's weights."""
    from transformers import AutoModelForCausalLM

    src = save_tiny(model_type, tmp_path / "src")
    text = ("Rivers run to the sea; the sea comes back as rain over the hills. " * 2)[:L]
    ids = torch.tensor(char_tokenizer()(text)["input_ids"])
    assert ids.numel() == L  # one token per character
    model, spec = tiny_model(model_type), spec_for(model_type)
    setting = Setting("g", "griffin", k=[keep_count(37, 0.5)] * 3, compensate=method, alpha=0.7)
    out = tmp_path / "out"
    export(str(src), [text[:P]], 0.5, out=out, compensate=method, alpha=0.7)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert griffin_nll(model, spec, setting, ids) == pytest.approx(
        continued_nll(model, exported, ids), rel=1e-4
    )


def neuron_weight_vectors(model_type: str, model: Any) -> list[list[list[list[float]]]]:
    """Per layer, per FF neuron j, the weight vectors that slicing neuron j keeps, read off
    the modules by name (independently of the architecture table): nn.Linear stores
    ``[out, in]`` (gate/up: row j, down: column j); Phi-3 stacks ``[gate; up]`` in one
    ``gate_up_proj`` (rows j and d_ff + j); GPT-2's Conv1D stores ``[in, out]`` (c_fc: column
    j, c_proj: row j)."""

    def rows(weight: torch.Tensor) -> list[list[float]]:
        return weight.detach().double().tolist()

    def columns(weight: torch.Tensor) -> list[list[float]]:
        return weight.detach().double().T.tolist()

    out = []
    if model_type == "gpt2":
        for block in model.transformer.h:
            fc, proj = columns(block.mlp.c_fc.weight), rows(block.mlp.c_proj.weight)
            out.append([[fc[j], proj[j]] for j in range(len(proj))])
    elif model_type == "gpt_neox":
        for block in model.gpt_neox.layers:
            up, down = rows(block.mlp.dense_h_to_4h.weight), columns(block.mlp.dense_4h_to_h.weight)
            out.append([[up[j], down[j]] for j in range(len(down))])
    elif model_type == "phi3":
        for block in model.model.layers:
            fused, down = rows(block.mlp.gate_up_proj.weight), columns(block.mlp.down_proj.weight)
            d_ff = len(down)
            out.append([[fused[j], fused[d_ff + j], down[j]] for j in range(d_ff)])
    else:
        for block in model.model.layers:
            gate, up = rows(block.mlp.gate_proj.weight), rows(block.mlp.up_proj.weight)
            down = columns(block.mlp.down_proj.weight)
            out.append([[gate[j], up[j], down[j]] for j in range(len(down))])
    return out


def hand_magnitude_keep(model_type: str, model: Any, k: list[int]) -> list[list[int]]:
    """Per layer, the k[l] neurons with the largest product of the L2 norms of their weight
    vectors (:func:`neuron_weight_vectors`), norms summed in plain Python, ties to the lower
    index."""
    keep = []
    for layer, neurons in enumerate(neuron_weight_vectors(model_type, model)):
        scores = [
            math.prod(math.sqrt(sum(v * v for v in vector)) for vector in vectors)
            for vectors in neurons
        ]
        keep.append(plain_top_k(scores, k[layer]))
    return keep


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_magnitude_keep_equals_hand_computed_weight_norms(model_type: str) -> None:
    """magnitude_keep's experts equal the top-k of the product of each neuron's weight norms
    computed here by plain loops, with a different k in every layer, on a separate gate/up
    (llama), a fused gate_up (phi3), GPT-2's transposed Conv1D and a gateless MLP (gpt_neox).
    Catches norms over the wrong axis (rows for a Conv1D, columns for a Linear), a fused
    gate_up split as interleaved rows (2j, 2j+1) or not split, a projection left out of the
    product (only down, or no gate), k taken from the wrong layer, and ties to the higher
    index."""
    model, spec = tiny_model(model_type), spec_for(model_type)
    k = [5, 18, 30]
    expected = hand_magnitude_keep(model_type, model, k)
    got = magnitude_keep(spec, model, k)
    assert [g.tolist() for g in got] == expected
    # The oracle can tell these apart: keeping by the down norms alone chooses other neurons.
    down_only = [
        plain_top_k([math.sqrt(sum(v * v for v in n[-1])) for n in layer], kk)
        for layer, kk in zip(neuron_weight_vectors(model_type, model), k, strict=True)
    ]
    assert down_only != expected


def test_baselines_are_static_and_seeded() -> None:
    """The magnitude and random rows each score exactly a full-model prompt continued by the
    model sliced to their fixed experts (the oracle: the full model's KV cache of the first P
    tokens, then ``prune_model`` to the hand-computed magnitude experts, or to the seeded
    random ones, on the rest), summed over the windows; the random row is reproducible from
    its seed and another seed gives another row. Catches a baseline that prunes the prompt
    too, re-chooses per window, uses other experts than its norms/seed give, or ignores the
    seed."""
    rows = griffin_rows(
        "gpt_neox", ratios=[0.5], refreshes=[0], window=None, baselines=["magnitude", "random"]
    )
    assert set(rows) == {"full", "griffin r=0.5", "magnitude r=0.5", "random r=0.5"}
    model, spec = tiny_model("gpt_neox"), spec_for("gpt_neox")
    k = [keep_count(37, 0.5)] * 3
    magnitude = [torch.tensor(keep) for keep in hand_magnitude_keep("gpt_neox", model, k)]
    for name, keep in (("magnitude r=0.5", magnitude), ("random r=0.5", random_keep(37, k, 0))):
        sliced = copy.deepcopy(model)
        prune_model(spec, sliced, keep)
        expected = sum(continued_nll(model, sliced, w.ids) for w in windows())
        assert rows[name] == pytest.approx(expected, rel=1e-5)
    again = griffin_rows("gpt_neox", ratios=[0.5], refreshes=[0], window=None, baselines=["random"])
    assert again["random r=0.5"] == rows["random r=0.5"]
    other = griffin_rows(
        "gpt_neox", ratios=[0.5], refreshes=[0], window=None, baselines=["random"], seed=1
    )
    assert other["random r=0.5"] != rows["random r=0.5"]
    with pytest.raises(UsageError, match="--baselines 'oracle'"):
        griffin_rows("gpt_neox", ratios=[0.5], refreshes=[0], window=None, baselines=["oracle"])


def test_cli_json_for_an_export_and_for_griffin(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "exp"
    export(str(src), ["Words of the prompt."], ratio=0.5, out=out)
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    runner = CliRunner()

    static = runner.invoke(
        app,
        [
            "ppl",
            "--model",
            str(out),
            "--dataset",
            str(text),
            "--seq-len",
            "64",
            "--max-windows",
            "3",
            "--json",
        ],
    )
    assert static.exit_code == 0, static.output
    data = json.loads(static.stdout)
    assert (
        data["protocol"] == "static" and data["seq_len"] == 64 and data["dataset"] == "corpus.txt"
    )
    assert data["tokens_scored"] == 3 * 63
    assert [r["name"] for r in data["results"]] == ["full", "exp"]
    assert data["results"][1]["ppl"] > 0 and "prompt_len" in data

    griffin = runner.invoke(
        app,
        [
            "ppl",
            "--model",
            str(src),
            "--dataset",
            str(text),
            "-L",
            "64",
            "-P",
            "32",
            "--max-windows",
            "2",
            "--ratio",
            "0.5",
            "--refresh",
            "0",
            "--refresh",
            "8",
            "--baselines",
            "random",
            "--json",
        ],
    )
    assert griffin.exit_code == 0, griffin.output
    data = json.loads(griffin.stdout)
    assert (
        data["protocol"] == "griffin" and data["prompt_len"] == 32 and data["tokens_scored"] == 64
    )
    names = [r["name"] for r in data["results"]]
    assert names == ["full", "griffin r=0.5", "griffin r=0.5 refresh=8", "random r=0.5"]


def test_cli_refuses_a_tampered_export(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "exp"
    export(str(src), ["Words of the prompt."], ratio=0.5, out=out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(
        app, ["ppl", "--model", str(out), "--dataset", "shakespeare", "--max-windows", "1"]
    )
    assert result.exit_code == 1
    assert "failed verification" in result.output


def test_bad_protocol_options() -> None:
    with pytest.raises(UsageError, match="--stride"):
        make_windows(torch.arange(100), 10, stride=11)
    with pytest.raises(UsageError, match="fewer than one window"):
        make_windows(torch.arange(5), 10)


def test_packaged_corpora() -> None:
    wiki = load_corpus("wiki-summaries")
    assert len(wiki.text) > 4_000_000 and "\n\n" in wiki.text
    shakespeare = load_corpus("shakespeare")
    assert "HAMLET" in shakespeare.text.upper()
    with pytest.raises(UsageError, match="neither a known corpus"):
        load_corpus("no-such-corpus")


def test_wikitext2_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        corpus = load_corpus("wikitext2")
    except ModelLoadError as exc:
        assert "wikitext2" in str(exc) and "offline" in str(exc)
    else:  # a machine that reaches the hub (or has it cached)
        assert len(corpus.text) > 100_000
