"""`griffin verify` on mixture-of-experts exports: an intact export passes (alone, against
its original, recomputed from its prompt), and each corruption of the kept-index map, the
manifest's moe record, the config or an expert's weights is named in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_moe import MODEL_TYPES, save_tiny_moe
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export
from griffin_export.build.reproduce import verify_with_prompt
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.formats.verify import check_original, verify_export
from griffin_export.formats.verify_moe import ModuleReader
from griffin_export.storage.fingerprint import file_sha256
from griffin_export.storage.safetensors_io import SafetensorsReader

PROMPT = "the quick brown fox jumps over the lazy dog, then the dog sleeps in the sun. " * 3
runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mixtral and gpt_oss exported without refit (every kept tensor exact), qwen2_moe with
    the default refit (down columns refitted), all at --experts 0.5 --ratio 0.5."""
    root = tmp_path_factory.mktemp("verify-moe")
    paths = {"root": root}
    for model_type, compensate in (
        ("mixtral", "none"),
        ("qwen2_moe", "refit"),
        ("gpt_oss", "none"),
    ):
        src = save_tiny_moe(model_type, root / f"{model_type}-src")
        out = root / f"{model_type}-out"
        export(str(src), [PROMPT], 0.5, experts=0.5, out=out, compensate=compensate)
        paths[model_type] = src
    return paths


def copy_export(made: dict[str, Path], model_type: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["root"] / f"{model_type}-out", tmp_path / model_type))


def resign(export_dir: Path) -> None:
    """What a careful tamperer does: every hash in the manifest rewritten to the files as they
    now are, so only the checks of content can notice."""
    manifest = json.loads((export_dir / MANIFEST).read_text())
    manifest["files"] = {name: file_sha256(export_dir / name) for name in manifest["files"]}
    (export_dir / MANIFEST).write_text(json.dumps(manifest))


def edit_file(export_dir: Path, name: str, change: Callable[[dict[str, torch.Tensor]], None]):
    path = export_dir / name
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def edit_manifest(export_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((export_dir / MANIFEST).read_text())
    change(manifest)
    (export_dir / MANIFEST).write_text(json.dumps(manifest))


def index_map(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / EXPERTS_FILE))


def unused_expert(kept: list[int], total: int = 8) -> int:
    return next(e for e in range(total) if e not in kept)


def only(problems: list[str], text: str) -> list[str]:
    """The problems that contain ``text`` (at least one, or the test fails)."""
    hits = [p for p in problems if text in p]
    assert hits, f"no problem mentions {text!r}: {problems}"
    return hits


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_intact_moe_export_verifies(made: dict[str, Path], model_type: str) -> None:
    """An intact export passes every check, against its original and recomputed from its
    prompt (catches a verify that reads MoE exports as dense ones: "layer.<i> missing", or
    that slices the original's per-expert checkpoint names wrongly, or that compares a
    refitted down projection with the original's)."""
    out = made["root"] / f"{model_type}-out"
    report = verify_with_prompt(out, [PROMPT], made[model_type])
    assert report.problems == []
    assert "kept experts, routers and FF tensors against the original" in report.checked
    assert "experts and neurons recomputed from the prompt" in report.checked
    check_original(out, made[model_type])  # the runtime's guard reads MoE originals too


def test_other_original_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    """A mixtral with other weights is not the original (catches a fingerprint that reads no
    MoE tensor: the routers are on disk as block_sparse_moe.gate, in memory as mlp.gate)."""
    other = save_tiny_moe("mixtral", tmp_path / "other", seed=1)
    report = verify_export(made["root"] / "mixtral-out", other)
    only(report.problems, "is not the model the export was made from")


def test_map_expert_differs_from_record(made: dict[str, Path], tmp_path: Path) -> None:
    """A kept expert index changed in the map alone (still ascending, distinct, in range)
    differs from the manifest's moe record (catches a verify that checks each entry's range
    and order but never against the record)."""
    out = copy_export(made, "mixtral", tmp_path)
    kept = index_map(out)["layer.1.experts"].tolist()
    wrong = sorted([*kept[:-1], unused_expert(kept)])

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layer.1.experts"] = torch.tensor(wrong, dtype=torch.int32)

    edit_file(out, EXPERTS_FILE, change)
    resign(out)
    problems = verify_export(out).problems
    (line,) = only(problems, "layer.1.experts")
    assert f"keeps experts {wrong} but the {MANIFEST} moe record says {kept}" in line


def test_wrong_expert_in_map_and_record(made: dict[str, Path], tmp_path: Path) -> None:
    """A wrong kept expert written consistently into the map and the record: the export's
    slab in that place is another expert's (catches a --original check that compares slabs
    by their position in the export instead of the recorded expert, or one that trusts the
    record), and the prompt selects the right one (catches a --prompt that compares neurons
    only)."""
    out = copy_export(made, "mixtral", tmp_path)
    kept = index_map(out)["layer.1.experts"].tolist()
    wrong = sorted([*kept[1:], unused_expert(kept)])
    moved = wrong.index(next(e for e in wrong if e not in kept))

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layer.1.experts"] = torch.tensor(wrong, dtype=torch.int32)

    def record(manifest: dict[str, Any]) -> None:
        manifest["moe"]["layers"][1]["experts"] = wrong

    edit_file(out, EXPERTS_FILE, change)
    edit_manifest(out, record)
    resign(out)
    assert verify_export(out).problems == []  # consistent: only the original can tell
    problems = verify_with_prompt(out, [PROMPT], made["mixtral"]).problems
    only(problems, f"layer 1 expert {wrong[moved]} (kept as {moved}): gate_up_proj: differs")
    # the prompt (with the original recorded in the manifest) selects the right experts
    problems = verify_with_prompt(out, [PROMPT]).problems
    (line,) = only(problems, "layer.1.experts")
    assert f"keeps experts {wrong} but the prompt selects {kept}" in line


def test_swapped_neuron_rows(made: dict[str, Path], tmp_path: Path) -> None:
    """Two kept experts' neuron rows swapped (each row still sorted and in range): the
    original's expert sliced at its recorded row is not the export's slab (catches a check
    that slices every expert with the same row, or validates rows only by their range), and
    the prompt selects the rows the other way round."""
    out = copy_export(made, "mixtral", tmp_path)
    entries = index_map(out)
    neurons, experts = entries["layer.2.neurons"], entries["layer.2.experts"].tolist()
    assert not torch.equal(neurons[0], neurons[1])

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layer.2.neurons"] = neurons[[1, 0, *range(2, len(neurons))]].contiguous()

    edit_file(out, EXPERTS_FILE, change)
    resign(out)
    assert verify_export(out).problems == []
    problems = verify_export(out, made["mixtral"]).problems
    only(problems, f"layer 2 expert {experts[0]} (kept as 0): gate_up_proj: differs")
    only(problems, f"layer 2 expert {experts[1]} (kept as 1): down_proj: differs")
    problems = verify_with_prompt(out, [PROMPT]).problems
    only(problems, f"layer.2.neurons: expert {experts[0]} keeps other neurons")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.flip(0), "indices not sorted ascending"),
        (lambda t: torch.cat([t[:1], t[:-1]]), "duplicate indices"),
        (lambda t: torch.cat([t[:-1], torch.tensor([16], dtype=t.dtype)]), "outside 0..15"),
    ],
)
def test_bad_neuron_row_names_its_expert(
    made: dict[str, Path],
    tmp_path: Path,
    change: Callable[[torch.Tensor], torch.Tensor],
    message: str,
) -> None:
    """One kept expert's neuron row broken: the line names the layer, the expert and the
    fault (catches a check of the whole [E', I'] tensor's range only, which a reversed or
    duplicated row passes)."""
    out = copy_export(made, "mixtral", tmp_path)
    entries = index_map(out)
    expert = int(entries["layer.0.experts"][2])

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        rows = tensors["layer.0.neurons"].clone()
        rows[2] = change(rows[2])
        tensors["layer.0.neurons"] = rows

    edit_file(out, EXPERTS_FILE, edit)
    resign(out)
    (line,) = only(verify_export(out).problems, "layer.0.neurons")
    assert f"the row of expert {expert}: " in line and message in line


def test_config_count_off_by_one(made: dict[str, Path], tmp_path: Path) -> None:
    """config.json's expert count one more than kept: the family's own key is named with the
    value to set (catches a check that reads a generic 'num_experts' instead of the MoeSpec
    row's count_key: mixtral's is num_local_experts), and the router no longer fits."""
    out = copy_export(made, "mixtral", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["num_local_experts"] += 1
    (out / "config.json").write_text(json.dumps(config))
    resign(out)
    problems = verify_export(out).problems
    only(
        problems,
        f"config.json: num_local_experts is 5 but {MANIFEST} keeps 4 routed experts per layer; "
        "set it to 4",
    )
    only(problems, "model.layers.0.mlp.gate.weight: shape (4, 32), but config.json builds (5, 32)")


def test_config_shared_width_off(made: dict[str, Path], tmp_path: Path) -> None:
    """qwen2_moe's shared-expert width key off by one (catches a check of the routed sizes
    only)."""
    out = copy_export(made, "qwen2_moe", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["shared_expert_intermediate_size"] -= 1
    (out / "config.json").write_text(json.dumps(config))
    resign(out)
    wrong = config["shared_expert_intermediate_size"]
    only(
        verify_export(out).problems, f"config.json: shared_expert_intermediate_size is {wrong} but"
    )


def test_altered_expert_slab(made: dict[str, Path], tmp_path: Path) -> None:
    """One element of one kept expert's gate weight changed: the hash names the file, and
    with the hashes forged, --original names the layer and the expert (catches a comparison
    of the routers and dense tensors only, or of shapes only)."""
    out = copy_export(made, "mixtral", tmp_path)
    experts = index_map(out)["layer.1.experts"].tolist()
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][3, 5] += 0.5

    edit_file(out, "model.safetensors", change)
    only(verify_export(out).problems, "model.safetensors: sha256 differs")
    resign(out)
    problems = verify_export(out, made["mixtral"]).problems
    (line,) = problems
    assert line.startswith(f"layer 1 expert {experts[2]} (kept as 2): gate_up_proj: differs")


def test_altered_fused_expert_bias(made: dict[str, Path], tmp_path: Path) -> None:
    """gpt-oss stores its experts fused ([E, H, 2I], gate and up interleaved, with biases):
    one kept neuron's up bias changed is caught for its expert (catches slicing the fused
    tensor as [gate; up] halves, or skipping the biases)."""
    out = copy_export(made, "gpt_oss", tmp_path)
    experts = index_map(out)["layer.0.experts"].tolist()
    key = "model.layers.0.mlp.experts.gate_up_proj_bias"

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][3, 1] += 0.25  # expert slot 3, neuron 0's up (interleaved: 2j + 1)

    edit_file(out, "model.safetensors", change)
    resign(out)
    (line,) = verify_export(out, made["gpt_oss"]).problems
    assert line.startswith(f"layer 0 expert {experts[3]} (kept as 3): gate_up_proj_bias: differs")


def test_refitted_export_checks_exact_parts(made: dict[str, Path], tmp_path: Path) -> None:
    """With refit, the kept experts' down columns are not the original's (verify passes them)
    but their gate/up rows, the routers and the shared expert's gate/up are: a changed router
    row is caught (catches a verify that skips every tensor of a refitted export)."""
    out = copy_export(made, "qwen2_moe", tmp_path)
    key = "model.layers.2.mlp.gate.weight"

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][1, 0] += 1.0

    edit_file(out, "model.safetensors", change)
    resign(out)
    (line,) = verify_export(out, made["qwen2_moe"]).problems
    assert line.startswith(f"layer 2 router: {key}: differs from the original's")


def test_shared_and_dense_entries(made: dict[str, Path], tmp_path: Path) -> None:
    """The dense layer's and the shared expert's rows are checked too (catches a verify that
    only reads layer.<i>.experts/neurons)."""
    out = copy_export(made, "qwen2_moe", tmp_path)

    shared = index_map(out)["layer.1.shared"].numel()

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layer.0"] = tensors["layer.0"].flip(0).contiguous()
        tensors["layer.1.shared"] = tensors["layer.1.shared"][:-1].contiguous()

    edit_file(out, EXPERTS_FILE, change)
    resign(out)
    problems = verify_export(out).problems
    only(problems, f"{EXPERTS_FILE} layer.0: indices not sorted ascending")
    only(problems, f"{EXPERTS_FILE} layer.1.shared: {shared - 1} indices but k is {shared}")


def test_other_prompt(made: dict[str, Path]) -> None:
    """--prompt with another text is refused before anything is recomputed."""
    problems = verify_with_prompt(made["root"] / "mixtral-out", ["another prompt"]).problems
    (line,) = problems
    assert line.startswith("prompt: not the prompt the export was made from")


def test_cli_one_line_per_problem(made: dict[str, Path], tmp_path: Path) -> None:
    """griffin verify on an MoE export: exit 0 when intact, else exit 1 with one 'problem:'
    line per finding."""
    good = made["root"] / "mixtral-out"
    result = runner.invoke(
        app, ["verify", "--model", str(good), "--original", str(made["mixtral"])]
    )
    assert result.exit_code == 0, result.output
    out = copy_export(made, "mixtral", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["num_local_experts"] = 3
    (out / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["verify", "--model", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert any("num_local_experts is 3" in line for line in lines)
    assert any("config.json: sha256 differs" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_verifies_and_names_an_altered_expert(model_type: str, tmp_path: Path) -> None:
    """Every MoE family of the table (tests/tiny_moe.py): its export verifies against its
    original, and one element of the last layer's kept expert in slot 1 changed on disk,
    hashes forged, is named by layer and expert (catches a checkpoint reader that misnames a
    family's on-disk experts: Mixtral's w1/w3, Qwen's gate_proj/up_proj, granite's fused
    input_linear, gpt-oss's interleaved gate_up_proj, all read through transformers' own
    mapping)."""
    src = save_tiny_moe(model_type, tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), [PROMPT], 0.5, experts=0.5, out=out, compensate="none")
    assert verify_export(out, src).problems == []
    layer = len(json.loads((out / MANIFEST).read_text())["k_per_layer"]) - 1
    expert = index_map(out)[f"layer.{layer}.experts"].tolist()[1]
    with SafetensorsReader.open(out) as reader:
        weights = ModuleReader(reader, model_type)
        (name,) = [
            n
            for n in weights.names()
            if f".{layer}." in n and n.endswith((".experts.gate_up_proj", ".experts.up_proj"))
        ]
        pieces = weights.pieces.get(name)
        key = pieces[1][0] if pieces else weights.plain[name]  # slot 1's piece, or the fused

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensor = tensors[key].clone()
        (tensor if pieces else tensor[1]).view(-1)[0] += 0.5
        tensors[key] = tensor

    edit_file(out, "model.safetensors", change)
    resign(out)
    (line,) = verify_export(out, src).problems
    leaf = name.rsplit(".", 1)[1]
    assert line.startswith(f"layer {layer} expert {expert} (kept as 1): {leaf}: differs")
