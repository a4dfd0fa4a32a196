"""`griffin export --format decilm`: per-layer exports of Llama-graph families in the DeciLM /
Nemotron-NAS layout (``block_configs`` with one ``ffn_mult`` per layer) that vLLM and llama.cpp's
converter read, loaded back by ``griffin_export.load_pretrained``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from test_streaming import PROMPTS, tensors
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, load_pretrained
from griffin_export.core.architectures import LLAMA_GRAPH, llama_graph_problem
from griffin_export.core.budgets import layer_sizes
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.decilm import ffn_mult_for
from griffin_export.formats.exports import open_export
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.formats.verify import verify_export

from tiny import random_ids, save_tiny, tiny_config

#: a tiny Llama whose protect widths are multiples of 256: 4 layers, d_ff 1024, keep 0.5
#: -> [768, 256, 256, 768] with --multiple-of 256
LAYERS, D_FF, RATIO = 4, 1024, 0.5
SIZES = [768, 256, 256, 768]
OPTIONS: dict[str, Any] = {"budget": "protect", "multiple_of": 256, "compensate": "none"}


def engine_width(ffn_mult: float, hidden_size: int) -> int:
    """The FF width vLLM's ``DeciLMForCausalLM`` and llama.cpp's ``DeciModel`` build for an
    ``ffn_mult``, re-implemented from their source: ``int(2 * ffn_mult * n_embd / 3)``, then
    ``_find_multiple(n, 256)`` (unchanged if divisible, else up to the next multiple)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    if n % 256 == 0:
        return n
    return n + 256 - (n % 256)


def _source(tmp_path: Path, model_type: str = "llama", **overrides: Any) -> Path:
    wanted = {"intermediate_size": D_FF, "num_hidden_layers": LAYERS, **overrides}
    return save_tiny(model_type, tmp_path / f"src-{model_type}", **wanted)


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text(encoding="utf-8"))


def _down_widths(directory: Path) -> list[int]:
    """Each layer's FF width from the safetensors header (down_proj's input axis)."""
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return [
            handle.get_slice(f"model.layers.{i}.mlp.down_proj.weight").get_shape()[1]
            for i in range(LAYERS)
        ]


@pytest.mark.parametrize("hidden", [32, 576, 960, 2048, 3072, 4096, 5120, 8192])
def test_ffn_mult_round_trips_every_multiple_of_256(hidden: int) -> None:
    """For every width 256..8192 in steps of 256, the ffn_mult written gives back exactly that
    width through the engines' own formula, after a JSON round trip, and is a float (llama.cpp
    asserts it). Catches ffn_mult = width / hidden (no 3/2), a rounded or truncated decimal
    (e.g. round(m, 4): off by one and rounded up to the next 256), and an int ffn_mult."""
    for width in range(256, 8192 + 1, 256):
        mult = json.loads(json.dumps(ffn_mult_for(width, hidden)))
        assert isinstance(mult, float)
        assert engine_width(mult, hidden) == width, (width, hidden, mult)


@pytest.mark.parametrize("width", [1, 100, 255, 300, 1000, 1536 + 1])
def test_ffn_mult_refuses_widths_the_engines_cannot_build(width: int) -> None:
    """A width that is not a positive multiple of 256 has no ffn_mult (the engines round every
    one up to a multiple of 256): refused naming --multiple-of 256. Catches writing 1.5 * k /
    hidden for any k, which would load with a wider FF than the weights."""
    with pytest.raises(UsageError, match="--multiple-of 256"):
        ffn_mult_for(width, 576)


def test_per_layer_decilm_export_loads_like_the_hf_layout_and_the_masked_full_model(
    tmp_path: Path,
) -> None:
    """A protect export in the DeciLM layout: config.json is DeciLM's (architectures, model_type,
    one block per layer whose ffn_mult the engines turn into the width its weights have), and
    load_pretrained gives exactly the logits of the same export in griffin's default layout and,
    to 1e-5, of the full model with every dropped neuron masked (an independent oracle).
    Catches widths written in the wrong order or from the wrong layer, a config that reads back
    with another width or KV-head count, and weights that differ between the layouts."""
    src = _source(tmp_path)
    deci = export(
        str(src), PROMPTS, RATIO, out=tmp_path / "deci", checkpoint_format="decilm", **OPTIONS
    )
    hf = export(str(src), PROMPTS, RATIO, out=tmp_path / "hf", **OPTIONS)
    assert (
        deci.k_per_layer
        == hf.k_per_layer
        == SIZES
        == layer_sizes("protect", LAYERS, D_FF, RATIO, 256)
    )

    config = _config(tmp_path / "deci")
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert "intermediate_size" not in config
    blocks = config["block_configs"]
    assert [engine_width(b["ffn"]["ffn_mult"], config["hidden_size"]) for b in blocks] == SIZES
    assert _down_widths(tmp_path / "deci") == SIZES
    heads, kv_heads = config["num_attention_heads"], tiny_config("llama").num_key_value_heads
    assert all(b["attention"]["n_heads_in_group"] == heads // kv_heads for b in blocks)
    assert not any(
        b[part]["no_op"] or b[part]["replace_with_linear"]
        for b in blocks
        for part in ("attention", "ffn")
    )
    assert config["rope_theta"] == tiny_config("llama").rope_parameters["rope_theta"]
    assert json.loads((tmp_path / "deci" / MANIFEST).read_text())["checkpoint_format"] == "decilm"
    assert "checkpoint_format" not in json.loads((tmp_path / "hf" / MANIFEST).read_text())

    ids = random_ids(24).reshape(1, -1)
    model = load_pretrained(tmp_path / "deci")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == SIZES
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, load_pretrained(tmp_path / "hf")(ids).logits)
        torch.testing.assert_close(
            got, _masked_full(src, tmp_path / "deci", ids), atol=1e-5, rtol=1e-5
        )


def _masked_full(src: Path, export_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the full source model with every neuron the export dropped zeroed at the
    down projection's input (kept indices from the export's experts map)."""
    full = AutoModelForCausalLM.from_pretrained(src).eval()
    with safe_open(str(export_dir / EXPERTS_FILE), "pt") as handle:
        keep = [handle.get_tensor(f"layer.{i}") for i in range(LAYERS)]
    handles = []
    for layer, kept in zip(full.model.layers, keep, strict=True):
        mask = torch.zeros(D_FF)
        mask[kept.long()] = 1.0
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, m=mask: (a[0] * m,))
        )
    try:
        with torch.no_grad():
            return full(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def test_uniform_decilm_export_loads(tmp_path: Path) -> None:
    """A uniform budget in the DeciLM layout (every layer 512): the config states 512 in every
    block and load_pretrained gives the logits of the default-layout export. Catches a uniform
    DeciLM export sent through stock from_pretrained (which cannot read model_type nemotron-nas)
    or written without block_configs."""
    src = _source(tmp_path)
    options = {**OPTIONS, "budget": "uniform"}
    export(str(src), PROMPTS, RATIO, out=tmp_path / "deci", checkpoint_format="decilm", **options)
    export(str(src), PROMPTS, RATIO, out=tmp_path / "hf", **options)
    config = _config(tmp_path / "deci")
    assert [engine_width(b["ffn"]["ffn_mult"], 32) for b in config["block_configs"]] == [512] * 4
    ids = random_ids(16).reshape(1, -1)
    with torch.no_grad():
        a = load_pretrained(tmp_path / "deci")(ids).logits
        assert torch.equal(a, load_pretrained(tmp_path / "hf")(ids).logits)


def test_streaming_and_in_memory_decilm_exports_are_identical(tmp_path: Path) -> None:
    """Both export paths write the same DeciLM config.json bytes, experts map and tensors (the
    config is written in one place for both). Catches a layout applied on one path only."""
    src = _source(tmp_path)
    for name, streaming in (("lean", True), ("full", False)):
        export(
            str(src),
            PROMPTS,
            RATIO,
            out=tmp_path / name,
            streaming=streaming,
            checkpoint_format="decilm",
            **OPTIONS,
        )
    lean, full = tmp_path / "lean", tmp_path / "full"
    for name in ("config.json", EXPERTS_FILE, "generation_config.json"):
        assert (lean / name).read_bytes() == (full / name).read_bytes(), name
    a, b = tensors(lean), tensors(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _config(lean)["model_type"] == "nemotron-nas"


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail loudly, so a refusal must come before it."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    module = importlib.import_module("griffin_export.build.export")
    monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(module, "load_streamed", refuse)


@pytest.mark.parametrize(
    ("d_ff", "ratio", "options", "fix"),
    [
        (D_FF, RATIO, {"budget": "protect"}, "use --multiple-of 256"),  # [1024, 256, 256, 1024]
        (D_FF, 0.3, {"budget": "uniform", "multiple_of": 100}, "use --multiple-of 256"),
        (1000, 1.0, {"budget": "uniform", "multiple_of": 256}, "use --format hf"),  # keeps 1000
        (200, RATIO, {"budget": "uniform"}, "use --format hf"),  # no multiple of 256 fits
    ],
    ids=["protect-needs-multiple-of", "wrong-multiple-of", "keeps-all-of-1000", "d_ff-below-256"],
)
def test_widths_that_would_not_survive_are_refused_before_loading(
    d_ff: int,
    ratio: float,
    options: dict[str, Any],
    fix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Widths that are not multiples of 256 are refused in one line naming what works (and
    --multiple-of 256 only where it would work), before any model loads; nothing is written.
    Catches writing ffn_mult for any width (the engines would build wider FF layers than the
    weights), suggesting --multiple-of 256 where d_ff itself is kept or is below 256, and a
    check that runs only after the model is loaded."""
    src = _source(tmp_path, intermediate_size=d_ff)
    _no_model_loads(monkeypatch)
    with pytest.raises(UsageError) as caught:
        export(
            str(src),
            PROMPTS,
            ratio,
            out=tmp_path / "out",
            checkpoint_format="decilm",
            compensate="none",
            **options,
        )
    message = str(caught.value)
    assert "\n" not in message and fix in message and "multiple of 256" in message
    if fix == "use --format hf":
        assert "--multiple-of 256" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model_type", "overrides", "field"),
    [
        ("qwen2", {}, "model_type 'qwen2'"),
        ("mistral", {"sliding_window": 16}, "sliding_window"),
        ("granite", {}, "attention_multiplier"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"head_dim": 16}, "head_dim"),
    ],
)
def test_families_without_llamas_graph_are_refused(
    model_type: str,
    overrides: dict[str, Any],
    field: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--format decilm on a family whose graph is not Llama's (another model_type, a sliding
    window, Granite's default attention multiplier 1.0 instead of 1/sqrt(head_dim), biases, a
    head_dim other than hidden/heads) is refused in one line naming the field and --format hf,
    before any model loads, and nothing is written. Catches a DeciLM file that vLLM or llama.cpp
    would run with a different graph than the model's."""
    src = _source(tmp_path, model_type, **overrides)
    _no_model_loads(monkeypatch)
    with pytest.raises(UsageError) as caught:
        export(
            str(src), PROMPTS, RATIO, out=tmp_path / "out", checkpoint_format="decilm", **OPTIONS
        )
    message = str(caught.value)
    assert "\n" not in message and field in message and "--format hf" in message
    assert not (tmp_path / "out").exists()


def test_llama_graph_accepts_neutral_granite_and_windowless_mistral() -> None:
    """The Llama-graph families pass when their extras are neutral: Granite with multipliers 1
    and attention_multiplier 1/sqrt(head_dim), Mistral without a sliding window, plain Llama.
    Catches a table that refuses every Granite or Mistral, or checks a multiplier against 1."""
    assert {"llama", "mistral", "granite"} <= LLAMA_GRAPH
    neutral = {"attention_multiplier": 8**-0.5, "embedding_multiplier": 1.0}
    assert llama_graph_problem(tiny_config("granite", **neutral)) is None
    assert llama_graph_problem(tiny_config("mistral")) is None  # tiny.py: sliding_window None
    assert llama_graph_problem(tiny_config("llama")) is None
    scaled = tiny_config("granite", **{**neutral, "logits_scaling": 2.0})
    assert "logits_scaling" in (llama_graph_problem(scaled) or "")


def test_granite_with_neutral_multipliers_round_trips(tmp_path: Path) -> None:
    """A Granite whose multipliers are neutral exports in the DeciLM layout and loads back as
    Granite with the default layout's logits (the griffin block keeps its model_type).
    Catches reading every DeciLM export back as Llama (it would drop Granite's fields)."""
    neutral = {"attention_multiplier": 8**-0.5}
    src = _source(tmp_path, "granite", **neutral)
    export(str(src), PROMPTS, RATIO, out=tmp_path / "deci", checkpoint_format="decilm", **OPTIONS)
    export(str(src), PROMPTS, RATIO, out=tmp_path / "hf", **OPTIONS)
    ids = random_ids(16).reshape(1, -1)
    model = load_pretrained(tmp_path / "deci")
    assert model.config.model_type == "granite"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_pretrained(tmp_path / "hf")(ids).logits)


def test_verify_open_export_and_ppl_read_a_decilm_export(tmp_path: Path) -> None:
    """verify finds no problem, open_export (generate, eval) loads it with load_pretrained's
    logits, and `griffin ppl --protocol static` runs on it. Catches commands that read
    config.json with transformers' AutoConfig, which has no nemotron-nas config class."""
    src = _source(tmp_path)
    out = tmp_path / "deci"
    export(str(src), PROMPTS, RATIO, out=out, checkpoint_format="decilm", **OPTIONS)
    assert verify_export(out).problems == []
    assert verify_export(out, original=str(src)).problems == []
    ids = random_ids(16).reshape(1, -1)
    opened = open_export(out)
    with torch.no_grad():
        assert torch.equal(opened.loaded.model(ids).logits, load_pretrained(out)(ids).logits)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A lazy dog sleeps while the quick fox runs. " * 40, encoding="utf-8")
    args = ["ppl", "--model", str(out), "--dataset", str(corpus), "--max-windows", "2"]
    result = CliRunner().invoke(app, [*args, "--protocol", "static", "--json"])
    assert result.exit_code == 0, result.output


def test_decilm_checkpoints_from_elsewhere(tmp_path: Path) -> None:
    """A DeciLM config without griffin's block (as NVIDIA ships them) loads as LlamaForCausalLM
    with the same logits; one with a no-op or linear-replacement layer is refused in one line
    (Llama's graph cannot run it). Catches a loader that needs griffin's block, and one that
    silently builds a full attention where the checkpoint has none."""
    src = _source(tmp_path)
    out = tmp_path / "deci"
    export(str(src), PROMPTS, RATIO, out=out, checkpoint_format="decilm", **OPTIONS)
    ids = random_ids(16).reshape(1, -1)
    with torch.no_grad():
        expected = load_pretrained(out)(ids).logits
    config = _config(out)
    del config["griffin"]
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model = load_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    for part, flag in (("attention", "no_op"), ("ffn", "replace_with_linear")):
        changed = json.loads(json.dumps(config))
        changed["block_configs"][1][part][flag] = True
        (out / "config.json").write_text(json.dumps(changed), encoding="utf-8")
        with pytest.raises(ExportFormatError, match=r"block_configs\[1\]") as caught:
            load_pretrained(out)
        assert "\n" not in str(caught.value)


def test_cli_format_option(tmp_path: Path) -> None:
    """`griffin export --format decilm` writes the layout and names it in the summary; an
    unknown --format is refused by the CLI. Catches an option that is parsed but not passed
    to the library."""
    src = _source(tmp_path)
    out = tmp_path / "cli"
    base = ["export", "--model", str(src), "--prompt-text", PROMPTS[0], "--out", str(out)]
    protect = ["--budget", "protect", "--multiple-of", "256", "--ratio", str(RATIO)]
    result = CliRunner().invoke(app, [*base, *protect, "--format", "decilm", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint_format"] == "decilm"
    assert _config(out)["model_type"] == "nemotron-nas"
    bad = CliRunner().invoke(app, [*base, "--format", "gguf", "--force"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_smollm2_protect_decilm_exports_and_loads(tmp_path: Path) -> None:
    """The embedded SmolLM2 (d_ff 1536, hidden 576): `--budget protect --ratio 0.5 --multiple-of
    256 --format decilm` exports, every block's ffn_mult gives its layer's width through the
    engines' formula, and load_pretrained gives the logits of the same export in griffin's
    default layout. Catches a layout that works only on tiny shapes (tied embeddings, 9 heads
    in groups of 3, rope_theta 100000)."""
    out, ref = tmp_path / "deci", tmp_path / "hf"
    args = ["--budget", "protect", "--ratio", "0.5", "--multiple-of", "256", "--compensate", "none"]
    prompt = ["--prompt-text", "The history of the printing press in Europe. " * 8]
    for directory, extra in ((out, ["--format", "decilm"]), (ref, [])):
        result = CliRunner().invoke(
            app, ["export", *prompt, *args, *extra, "--out", str(directory)]
        )
        assert result.exit_code == 0, result.output
    config = _config(out)
    ks = json.loads((out / MANIFEST).read_text())["k_per_layer"]
    assert len(set(ks)) > 1 and all(k % 256 == 0 for k in ks)
    assert [engine_width(b["ffn"]["ffn_mult"], 576) for b in config["block_configs"]] == ks
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    ids = torch.tensor([[1, 504, 3458, 282, 260, 6041, 2913, 281, 3045, 30]])
    model = load_pretrained(out)
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == ks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_pretrained(ref)(ids).logits)
