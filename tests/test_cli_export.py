"""`griffin export` through the CLI: a tiny model, and the embedded SmolLM2 end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import load_pretrained, spec_for
from griffin_export.build.export import EXPERTS_FILE
from griffin_export.formats.layout import prune_model_per_layer
from griffin_export.storage.sources import resolve_source

from tiny import save_tiny

runner = CliRunner()
EXAMPLE_PROMPT = Path(__file__).parents[1] / "examples" / "prompt.txt"


def test_help_documents_every_option() -> None:
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for option in (
        "--model",
        "--prompt",
        "--prompt-text",
        "--ratio",
        "--multiple-of",
        "--out",
        "--dtype",
        "--device",
        "--max-prompt-tokens",
        "--force",
        "--json",
    ):
        assert option in text, option


def test_tiny_export_json_summary(tmp_path: Path) -> None:
    src = save_tiny("mistral", tmp_path / "src")
    prompt = tmp_path / "p.txt"
    prompt.write_text("A prompt from a file.\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["export", "--model", str(src), "--prompt", str(prompt), "--prompt-text", "And text."]
    result = runner.invoke(app, [*args, "--ratio", "0.25", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["k_per_layer"] == [9, 9, 9]
    assert summary["out_dir"] == str(out)
    assert summary["params_after"] < summary["params_before"]
    assert (out / "model.safetensors").is_file()

    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 1
    assert "already exists" in again.output and "--force" in again.output
    forced = runner.invoke(app, [*args, "--ratio", "0.5", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 18


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "smol-half"
    args = ["export", "--prompt", str(EXAMPLE_PROMPT), "--ratio", "0.5", "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["d_ff"] == 1536 and set(summary["k_per_layer"]) == {768}
    assert summary["n_layers"] == 30
    # 70.4% of the full model's bytes (FF is 79.6M of 134.5M parameters), within 1%
    assert summary["file_bytes"] / summary["bytes_before"] == pytest.approx(0.704, rel=0.01)

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.intermediate_size == 768
    inputs = tokenizer("Rain falls when", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8
    assert tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :]).strip()


@pytest.mark.slow
def test_embedded_model_protect_budget(tmp_path: Path) -> None:
    """--budget protect on the real model: layers 0 and 29 dense, the same total as uniform,
    refused by stock from_pretrained, and load_pretrained's logits equal slicing the original
    at the recorded indices."""
    out = tmp_path / "smol-protect"
    args = ["export", "--prompt", str(EXAMPLE_PROMPT), "--ratio", "0.5", "--out", str(out)]
    result = runner.invoke(app, [*args, "--budget", "protect", "--compensate", "none", "--json"])
    assert result.exit_code == 0, result.output
    ks = json.loads(result.stdout)["k_per_layer"]
    assert ks[0] == ks[-1] == 1536 and set(ks[1:-1]) <= {713, 714} and sum(ks) == 30 * 768
    assert json.loads((out / "config.json").read_text())["griffin"]["intermediate_sizes"] == ks
    with pytest.raises((RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(out)

    model = load_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m").directory)
    experts = load_file(str(out / EXPERTS_FILE))
    spec = spec_for(original.config.model_type)
    prune_model_per_layer(spec, original, [experts[f"layer.{i}"].long() for i in range(30)])
    ids = AutoTokenizer.from_pretrained(out)("Rain falls when", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
