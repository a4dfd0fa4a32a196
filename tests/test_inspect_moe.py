"""`griffin inspect` on mixture-of-experts exports: which experts each layer kept (marked in
their places among all), the routing mass they carried, the FF neurons and bytes kept, in the
table, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from test_verify_moe import PROMPT
from tiny_moe import save_tiny_moe
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export
from griffin_export.evaluation.inspection import (
    DROPPED_MARK,
    FILLED_MARK,
    KEPT_MARK,
    MoeLayerRow,
    summarize_export,
)
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qwen2_moe (a dense layer 0, a shared expert) and mixtral, --experts 0.5 --ratio 0.5."""
    root = tmp_path_factory.mktemp("inspect-moe")
    paths: dict[str, Path] = {}
    for model_type in ("qwen2_moe", "mixtral"):
        src = save_tiny_moe(model_type, root / f"{model_type}-src")
        export(str(src), [PROMPT], 0.5, experts=0.5, out=root / model_type, compensate="none")
        paths[model_type] = root / model_type
        paths[f"{model_type}-src"] = src
    return paths


def positions(marks: str, mark: str) -> list[int]:
    return [i for i, c in enumerate(marks.replace(" ", "")) if c == mark]


def test_marks_put_each_expert_in_its_place() -> None:
    """Kept experts are marked at their own indices, filled ones apart, the rest removed,
    grouped by 8 (catches marks in the order of the kept list, or filled experts drawn as
    routed ones)."""
    row = MoeLayerRow(
        layer=3, experts=[0, 9, 10, 17], total=20, mass_kept=0.5, filled=[10], refit=2
    )
    marks = row.marks()
    assert [len(g) for g in marks.split(" ")] == [8, 8, 4]
    assert positions(marks, KEPT_MARK) == [0, 9, 17]
    assert positions(marks, FILLED_MARK) == [10]
    assert len(positions(marks, DROPPED_MARK)) == 20 - 4


def layer_bytes(path: Path, layer: int) -> int:
    """Bytes of one layer's routed and shared experts in a checkpoint, from its header."""
    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if f"layers.{layer}." in key and (".experts." in key or ".shared_expert." in key):
                shape = handle.get_slice(key).get_shape()
                size = 1
                for n in shape:
                    size *= n
                total += size * 4  # float32
    return total


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_json_reflects_the_export(made: dict[str, Path], model_type: str) -> None:
    """--json: each layer's kind, kept experts (marked in place) and mass kept are the export's
    own (the kept-index map, an independent file from the manifest), and an MoE layer's bytes
    saved are what its experts weigh in the original minus in the export (catches a summary
    that reads dense FF names, so saves 0 bytes on an MoE layer, or marks the wrong experts)."""
    out = made[model_type]
    result = runner.invoke(app, ["inspect", "--model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    kept_map = load_file(str(out / EXPERTS_FILE))
    record = json.loads((out / MANIFEST).read_text())["moe"]
    mass = {entry["layer"]: entry["mass_kept"] for entry in record["layers"]}
    for layer in data["layers"]:
        i = layer["layer"]
        if f"layer.{i}" in kept_map:
            assert layer["kind"] == "dense"
            continue
        assert layer["kind"] == "moe"
        kept = kept_map[f"layer.{i}.experts"].tolist()
        assert positions(layer["marks"], KEPT_MARK) == kept == layer["experts"]
        assert layer["mass_kept"] == mass[i]
        saved = layer_bytes(made[f"{model_type}-src"], i) - layer_bytes(out, i)
        assert layer["bytes_saved"] == saved
    assert data["moe"]["sizes"] == record["sizes"]


def test_table_shows_marks_and_dense_layers(made: dict[str, Path]) -> None:
    """The table has one row of marks per MoE layer and names the dense layer."""
    out = made["qwen2_moe"]
    summary = summarize_export(out)
    assert summary.moe is not None
    result = runner.invoke(app, ["inspect", "--model", str(out)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for row in summary.moe.layers:
        (line,) = [x for x in lines if x.startswith(f"│ {row.layer:>5} │")]
        assert row.marks() in line and f"{row.mass_kept:.3f}" in line
    assert any(x.startswith("│     0 │ dense") for x in lines)


def test_moe_plot(made: dict[str, Path], tmp_path: Path) -> None:
    """--plot on an MoE export draws the experts picture (a PNG is written)."""
    png = tmp_path / "moe.png"
    result = runner.invoke(app, ["inspect", "--model", str(made["mixtral"]), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000


def test_routing_of_a_moe_model(made: dict[str, Path], tmp_path: Path) -> None:
    """--prompt on an MoE model shows where the prompt is routed: each expert's routed-token
    count is the count of tokens whose top-2 router logits name it (the model's own router
    logits, an independent oracle), and mixtral's renormalised weights make every layer's
    mass one per token (catches counting every expert a token's softmax touches, or the
    flocking view crashing on a model without a dense FF)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import char_tokenizer

    src = made["mixtral-src"]
    text = "experts route tokens; the fox runs."
    prompt = tmp_path / "p.txt"
    prompt.write_text(text)
    result = runner.invoke(app, ["inspect", "--model", str(src), "--prompt", str(prompt), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ids = char_tokenizer()(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    assert data["tokens"] == len(ids)
    assert [row["layer"] for row in data["layers"]] == list(range(len(logits)))
    for row, layer_logits in zip(data["layers"], logits, strict=True):
        routed = layer_logits.topk(2, dim=-1).indices.reshape(-1)
        assert row["tokens"] == torch.bincount(routed, minlength=8).tolist()
        assert sum(row["mass"]) == pytest.approx(len(ids), rel=1e-5)
    table = runner.invoke(app, ["inspect", "--model", str(src), "--prompt", str(prompt)])
    assert table.exit_code == 0 and "top experts" in table.stdout
    png = tmp_path / "routing.png"
    args = ["inspect", "--model", str(src), "--prompt", str(prompt), "--plot", str(png)]
    assert runner.invoke(app, args).exit_code == 0
    assert png.stat().st_size > 1000
