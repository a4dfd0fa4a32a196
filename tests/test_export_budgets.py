"""`griffin export --budget`: per-layer exports round-trip, stream like in-memory, verify, feed
`griffin ppl` and the runtime; uniform stays the byte-identical stock export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_streaming import PROMPTS, assert_same_export
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, load_pretrained, read_manifest, spec_for
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.selection import select_experts
from griffin_export.errors import UsageError
from griffin_export.evaluation.ppl import evaluate
from griffin_export.evaluation.protocols import Setting, make_windows
from griffin_export.formats.exports import open_export
from griffin_export.formats.layout import prune_model_per_layer
from griffin_export.formats.manifest import MANIFEST
from griffin_export.formats.verify import verify_export

from tiny import D_FF, LAYERS, char_tokenizer, random_ids, save_tiny, tiny_model

RATIO = 0.8  # protect on the tiny models (3 layers, d_ff 37): [37, 16, 37]
SIZES = [37, 16, 37]


def _corpus(tmp_path: Path) -> Path:
    text = tmp_path / "corpus.txt"
    text.write_text("A lazy dog sleeps while the quick fox runs. " * 40, encoding="utf-8")
    return text


def _ppl(model: Path, corpus: Path, *options: str):  # -> click.testing.Result
    """``griffin ppl --json`` on 2 windows of ``corpus``."""
    args = ["ppl", "--model", str(model), "--dataset", str(corpus), "--max-windows", "2"]
    return CliRunner().invoke(app, [*args, *options, "--json"])


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt"])
def test_protect_export_round_trips_through_load_pretrained(
    model_type: str, tmp_path: Path
) -> None:
    """load_pretrained(export) gives the logits of the same model sliced in memory."""
    src = save_tiny(model_type, tmp_path / "src")
    result = export(
        str(src), PROMPTS, RATIO, out=tmp_path / "out", budget="protect", compensate="none"
    )
    assert result.k_per_layer == SIZES == layer_sizes("protect", LAYERS, D_FF, RATIO)
    assert result.budget == "protect"

    spec = spec_for(model_type)
    reference = tiny_model(model_type)
    tokenizer = char_tokenizer()
    ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS]
    selection = select_experts(spec, reference, ids, RATIO, k_per_layer=SIZES)
    prune_model_per_layer(spec, reference, selection.keep)

    loaded = load_pretrained(tmp_path / "out")
    assert type(loaded) is type(reference)
    probe = random_ids(29, seed=7).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=probe).logits, reference(input_ids=probe).logits, rtol=0, atol=0
        )


def test_protect_export_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_tiny("llama", tmp_path / "src")
    export(str(src), PROMPTS, RATIO, out=tmp_path / "out", budget="protect")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == max(SIZES)
    assert config["griffin"]["intermediate_sizes"] == SIZES
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["budget"] == "protect" and manifest["k_per_layer"] == SIZES
    # the typed manifest reads back every field (a dropped budget would read as uniform)
    typed = read_manifest(out)
    assert typed.budget == "protect" and typed.to_dict() == manifest
    assert "griffin_export.load_pretrained" in (out / "README.md").read_text()
    assert verify_export(out, src).problems == []
    with pytest.raises(Exception, match=r"(?i)size|shape"):  # stock loading refuses, loudly
        AutoModelForCausalLM.from_pretrained(out)
    # the default output directory names the budget
    monkeypatch.chdir(tmp_path)
    default = export(str(src), PROMPTS, RATIO, budget="protect")
    assert default.out_dir == Path("src-griffin-0.8-protect") and default.out_dir.is_dir()


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_protect_streaming_equals_in_memory(model_type: str, sharded: bool, tmp_path: Path) -> None:
    """Bit-identical weights, experts, config and manifest (ratio 0.4: sizes [22, 1, 22])."""
    assert_same_export(tmp_path, tiny_model(model_type), sharded, PROMPTS, budget="protect")
    config = json.loads((tmp_path / "lean" / "config.json").read_text())
    assert config["griffin"]["intermediate_sizes"] == layer_sizes("protect", LAYERS, D_FF, 0.4)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "in-memory"])
def test_uniform_budget_is_the_default_export_bit_for_bit(streaming: bool, tmp_path: Path) -> None:
    src = save_tiny("gpt2", tmp_path / "src")
    options: dict = {"streaming": streaming, "max_shard_size": "20KB"}
    export(str(src), PROMPTS, 0.5, out=tmp_path / "a", **options)
    export(str(src), PROMPTS, 0.5, out=tmp_path / "b", budget="uniform", **options)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # and it is the stock format: no per-layer list, no budget in the manifest
    assert "intermediate_sizes" not in json.loads((tmp_path / "a" / "config.json").read_text())
    assert "budget" not in json.loads((tmp_path / "a" / MANIFEST).read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_verify_checks_per_layer_sizes_against_the_manifest(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), PROMPTS, RATIO, out=out, budget="protect")
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["griffin"]["intermediate_sizes"] = [16, 37, 37]
    path.write_text(json.dumps(config))
    problems = verify_export(out, hash_files=False).problems
    assert any("griffin.intermediate_sizes is [16, 37, 37]" in p for p in problems), problems
    del config["griffin"]["intermediate_sizes"]
    path.write_text(json.dumps(config))
    problems = verify_export(out, hash_files=False).problems
    assert any("no griffin.intermediate_sizes" in p for p in problems), problems


def test_ppl_and_runtime_open_a_per_layer_export(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), PROMPTS, RATIO, out=out, budget="protect")
    opened = open_export(out)
    assert [
        spec_for("llama").down_module(b).weight.shape[1]
        for b in spec_for("llama").blocks(opened.loaded.model)
    ] == SIZES
    result = _ppl(out, _corpus(tmp_path), "-L", "64")
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)["results"]] == ["full", "out"]

    from griffin_export.runtime.refresh import GriffinRuntime

    runtime = GriffinRuntime.from_export(out)
    generated = runtime.generate("The quick", 12, refresh_every=4, window=8)
    assert [len(s) for s in runtime.slots] == SIZES
    assert generated.refreshes


def test_ppl_griffin_protocol_with_per_layer_budgets() -> None:
    """A protect row equals the full model's prompt cache continued by a model sliced to the
    prompt's experts at the protect sizes (the masked forward is exact per layer too)."""
    model, spec = tiny_model("llama"), spec_for("llama")
    seq, prompt = 48, 20
    ids = random_ids(seq, seed=9)
    report = evaluate(
        [(model, spec, Setting("p", "griffin", k=SIZES))],
        make_windows(ids, seq, min_score_from=prompt),
        dataset="t",
        protocol="griffin",
        prompt_len=prompt,
    )
    pruned = copy.deepcopy(model)
    keep = select_experts(spec, model, [ids[:prompt]], RATIO, k_per_layer=SIZES).keep
    prune_model_per_layer(spec, pruned, keep)
    with torch.no_grad():
        prefix = model(input_ids=ids[None, :prompt], use_cache=True)
        rest = pruned(input_ids=ids[None, prompt:], cache=prefix.past_key_values, use_cache=True)
    logits = torch.cat([prefix.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[prompt:], reduction="sum")
    assert report.rows[0].nll == pytest.approx(float(nll), rel=1e-4)


def test_cli_ppl_compares_budgets_in_one_run(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    griffin = ("-L", "64", "-P", "32", "--ratio", "0.8")
    result = _ppl(src, _corpus(tmp_path), *griffin, "--budget", "uniform,protect")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [r["name"] for r in data["results"]]
    assert names == ["full", "griffin r=0.8", "griffin r=0.8 protect"]
    assert data["params"]["budgets"] == ["uniform", "protect"]

    bad = _ppl(src, _corpus(tmp_path), *griffin, "--budget", "energy")
    assert bad.exit_code == 2  # refused by the parser, choices named
    assert "Invalid value for '--budget'" in bad.output
    assert "'energy' is not one of 'uniform', 'protect'" in bad.output


def test_cli_export_budget(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    base = ["export", "--model", str(src), "--prompt-text", PROMPTS[0], "--ratio", "0.8"]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--budget", "protect", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, [*base, "--budget", "protect", "--out", str(tmp_path / "j"), "--json"]
    )
    data = json.loads(result.stdout)
    assert data["budget"] == "protect" and data["k_per_layer"] == SIZES

    bad_args = [*base, "--budget", "energy", "--out", str(tmp_path / "x")]
    bad = runner.invoke(app, bad_args, env={"COLUMNS": "200"})
    assert bad.exit_code == 2  # refused by the parser, choices named
    assert "Invalid value for '--budget'" in bad.output
    assert "'energy' is not one of 'uniform', 'protect'" in bad.output
    assert not (tmp_path / "x").exists()


def test_library_export_refuses_an_unknown_budget_before_loading(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--budget 'minimax'"):
        export(str(tmp_path / "does-not-exist"), PROMPTS, 0.5, budget="minimax")
