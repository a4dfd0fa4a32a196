"""The streaming export of a mixture of experts is bit-identical to the in-memory one, and
reads from disk only the experts the prompt routes to and the experts it keeps."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tiny_moe import MODEL_TYPES, save_tiny_moe, tiny_moe_model
from transformers import AutoModelForCausalLM

from griffin_export import export
from griffin_export.build import export as export_module
from griffin_export.build.streaming import NotStreamableError
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.storage.safetensors_io import SafetensorsReader

from tiny import char_tokenizer

PROMPTS = ["Flocking neurons carry the activation. " * 3, "A second prompt, pooled with it."]

#: families whose checkpoints store the routed experts fused ([experts, ...]). from_pretrained
#: leaves their tensors where it loaded them (8 bytes past a 64-byte boundary here), and CPU
#: float32 matmuls on differently aligned operands can round differently, so the in-memory
#: refit differs from the streamed one in the last bits. With its parameters copied to fresh
#: (aligned) memory the in-memory export equals the streamed one bit for bit: compared so.
FUSED_ON_DISK = {"granitemoe", "gpt_oss"}
#: families with a tensor that loading converts and streaming does not reproduce -> its name
NOT_STREAMABLE = {"sarvam_moe": "query_key_value"}  # fused attention that loading splits


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name == EXPERTS_FILE:
            continue
        with safe_open(str(path), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def assert_same_export(src: Path, out: Path, **options: Any) -> None:
    """Streaming and in-memory exports of ``src`` agree: tensors bit for bit, config,
    kept-index map, card, and the manifest but for the weight files' hashes (the shards are
    laid out differently)."""
    lean = export(str(src), PROMPTS, 0.5, out=out / "lean", streaming=True, **options)
    full = export(str(src), PROMPTS, 0.5, out=out / "full", streaming=False, **options)
    a, b = tensors(out / "lean"), tensors(out / "full")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (lean.params_before, lean.params_after) == (full.params_before, full.params_after)
    assert (lean.bytes_before, lean.bytes_after) == (full.bytes_before, full.bytes_after)
    ma = json.loads((out / "lean" / MANIFEST).read_text())
    mb = json.loads((out / "full" / MANIFEST).read_text())
    files_a, files_b = ma.pop("files"), mb.pop("files")
    assert ma == mb  # fingerprint, sizes, moe record (kept experts, mass, filled, refits)...
    assert {k for k in files_a if "safetensors" not in k} == {
        k for k in files_b if "safetensors" not in k
    }
    for name in ("config.json", "generation_config.json", "README.md", EXPERTS_FILE):
        assert (out / "lean" / name).read_bytes() == (out / "full" / name).read_bytes(), name


@pytest.mark.parametrize("compensate", ["refit", "none"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_streaming_moe_equals_in_memory(model_type: str, compensate: str, tmp_path: Path) -> None:
    """Streaming and in-memory exports agree bit for bit: tensors (names, dtypes, bytes),
    config, kept-index map and manifest. Catches a per-expert checkpoint tensor put in the
    wrong expert's slot or half (w1/w3, gate/up swapped), a refit computed from or written
    to other columns than the in-memory path's (or applied before the last prompt passed),
    a fingerprint sampled after the refit, dense layer 0 or the shared expert (qwen2_moe)
    sliced or refitted differently, and output keys renumbered otherwise than
    save_pretrained writes them."""
    src = save_tiny_moe(model_type, tmp_path / "src")
    assert_same_export(src, tmp_path, experts=0.5, compensate=compensate)


def test_streaming_moe_sharded_source_and_output(tmp_path: Path) -> None:
    """A source whose per-expert tensors of one layer lie in several shards, written into
    several shards. Catches reading an expert's tensors from one shard only, and a write
    plan whose order or cut differs from the tensors handed to the writer."""
    src = tmp_path / "src"
    tiny_moe_model("qwen2_moe").save_pretrained(src, max_shard_size="20KB")
    char_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    assert_same_export(src, tmp_path, experts=0.5, max_shard_size="30KB")
    assert len(list((tmp_path / "lean").glob("model-*.safetensors"))) > 1


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streaming_moe_every_family(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every MoE family of the table streams bit-identically to its in-memory export, with
    refit (FUSED_ON_DISK: the in-memory model's tensors copied to aligned memory first); a
    family streaming cannot read (NOT_STREAMABLE) is refused when streaming is asked for
    and exported in memory by default. Catches a family whose checkpoint layout (fused on
    disk, renamed blocks, selection biases, group routing, gpt-oss's biases and interleaved
    gate/up) the streamed reading or the reverted writing gets wrong, and a default export
    that fails where the in-memory path works."""
    if model_type in FUSED_ON_DISK:
        load = export_module.load_model

        def aligned(*args: Any, **kwargs: Any) -> Any:
            loaded = load(*args, **kwargs)
            for module in loaded.model.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(
                            param.data.clone(), requires_grad=False
                        )
            return loaded

        monkeypatch.setattr(export_module, "load_model", aligned)
    src = save_tiny_moe(model_type, tmp_path / "src")
    if model_type in NOT_STREAMABLE:  # refused when asked for, in memory by default
        with pytest.raises(NotStreamableError, match=NOT_STREAMABLE[model_type]):
            export(str(src), PROMPTS, 0.5, experts=0.5, out=tmp_path / "lean", streaming=True)
        export(str(src), PROMPTS, 0.5, experts=0.5, out=tmp_path / "auto")
        export(str(src), PROMPTS, 0.5, experts=0.5, out=tmp_path / "full", streaming=False)
        a, b = tensors(tmp_path / "auto"), tensors(tmp_path / "full")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return
    assert_same_export(src, tmp_path, experts=0.5)


def routed_experts(src: Path, prompts: list[str]) -> dict[int, set[int]]:
    """Per layer, the experts the full model routes the prompts' tokens to (hooks on
    transformers' own experts modules; no griffin code)."""
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tokenizer = char_tokenizer()
    routed: dict[int, set[int]] = defaultdict(set)
    layers = model.model.layers
    handles = []
    for layer, block in enumerate(layers):
        for name, module in block.named_modules():
            if name.endswith("experts") and hasattr(module, "gate_up_proj"):
                total = module.gate_up_proj.shape[0]

                def hook(_m, args, layer=layer, total=total):  # type: ignore[no-untyped-def]
                    routed[layer].update(e for e in args[1].unique().tolist() if 0 <= e < total)

                handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            model(ids)
    for handle in handles:
        handle.remove()
    return dict(routed)


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe"])
def test_streaming_moe_reads_only_routed_and_kept_experts(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte read from the source is logged (SafetensorsReader._read_into, which every
    whole-tensor, range and chunk read goes through). Of the routed experts' tensors, an MoE
    layer reads exactly the experts the prompt routes to (the forward needs them) plus the
    kept ones it never routes to (filled places): a removed expert no token reaches is never
    read. Catches reading a whole block's experts (or a whole fused [experts, ...] tensor,
    granitemoe) as the dense streaming export reads a block, and reading experts again to
    write them."""
    src = save_tiny_moe(model_type, tmp_path / "src", num_local_experts=32, num_experts=32)
    prompt = ["Flock."]  # few tokens: most of the 32 experts unrouted
    reads: list[tuple[str, int, int]] = []
    original = SafetensorsReader._read_into

    def logged(self: SafetensorsReader, key: str, view: memoryview, offset: int) -> None:
        reads.append((key, offset, len(view)))
        original(self, key, view, offset)

    monkeypatch.setattr(SafetensorsReader, "_read_into", logged)
    result = export(
        str(src), prompt, 0.5, experts=0.25, out=tmp_path / "out", streaming=True, force=True
    )
    monkeypatch.undo()
    routed = routed_experts(src, prompt)
    kept = {entry["layer"]: set(entry["experts"]) for entry in result.moe["layers"]}
    reader = SafetensorsReader.open(src)
    read: dict[int, set[int]] = defaultdict(set)
    for key, offset, nbytes in reads:
        if ".experts." in key:  # mixtral: layers.L.block_sparse_moe.experts.E.w1.weight
            parts = key.split(".")
            read[int(parts[2])].add(int(parts[parts.index("experts") + 1]))
        elif "input_linear" in key or "output_linear" in key:  # granitemoe: fused on disk
            entry = reader._entries[key]
            slab = entry.nbytes // entry.shape[0]
            first = (offset - entry.offset) // slab
            last = (offset - entry.offset + nbytes - 1) // slab
            read[int(key.split(".")[2])].update(range(first, last + 1))
    reader.close()
    assert kept.keys() == routed.keys() and read
    unread_somewhere = False
    for layer, experts in kept.items():
        assert read[layer] == routed[layer] | experts, layer
        unread_somewhere |= len(read[layer]) < 32
    assert unread_somewhere  # the prompt left experts unrouted: the test could fail
