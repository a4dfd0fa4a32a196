"""The streaming export is bit-identical to the in-memory one, on every architecture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from griffin_export import export
from griffin_export.build import streaming
from griffin_export.errors import ModelLoadError
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.storage.safetensors_io import SafetensorsReader, ShardWriter

from tiny import MODEL_TYPES, char_tokenizer, save_tiny, tiny_model

PROMPTS = ["Flocking neurons carry the activation.", "A second prompt, pooled with the first."]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_streaming_equals_in_memory(model_type: str, sharded: bool, tmp_path: Path) -> None:
    assert_same_export(tmp_path, tiny_model(model_type), sharded, PROMPTS)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streaming_tied_and_untied(model_type: str, tied: bool, tmp_path: Path) -> None:
    model = tiny_model(model_type, tie_word_embeddings=tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert_same_export(tmp_path, model, True, PROMPTS[:1])


def test_streaming_bf16_source_to_float32(tmp_path: Path) -> None:
    """A dtype change converts each tensor exactly as from_pretrained does."""
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    assert_same_export(tmp_path, model, False, PROMPTS, dtype="float32")


def assert_same_export(
    tmp_path: Path, model: torch.nn.Module, sharded: bool, prompts: list[str], **options: object
) -> None:
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB" if sharded else "5GB")
    char_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file() == sharded

    shard = "30KB" if sharded else "5GB"
    kwargs: dict = {"max_shard_size": shard, **options}
    lean = export(str(src), prompts, 0.4, out=tmp_path / "lean", streaming=True, **kwargs)
    full = export(str(src), prompts, 0.4, out=tmp_path / "full", streaming=False, **kwargs)

    a, b = tensors(tmp_path / "lean"), tensors(tmp_path / "full")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (lean.bytes_before, lean.bytes_after) == (full.bytes_before, full.bytes_after)
    assert (lean.params_before, lean.params_after) == (full.params_before, full.params_after)
    ma = json.loads((tmp_path / "lean" / MANIFEST).read_text())
    mb = json.loads((tmp_path / "full" / MANIFEST).read_text())
    assert ma["source"]["fingerprint"] == mb["source"]["fingerprint"]
    assert ma["k_per_layer"] == mb["k_per_layer"]
    ca = json.loads((tmp_path / "lean" / "config.json").read_text())
    cb = json.loads((tmp_path / "full" / "config.json").read_text())
    assert ca == cb
    assert lean.k_per_layer == full.k_per_layer and lean.prompt_tokens == full.prompt_tokens
    # Same files beside the weights. Shard cuts may differ: save_pretrained sizes a tensor by
    # its storage, which for some loaded views is larger than the tensor.
    names = {p.name for p in (tmp_path / "lean").iterdir() if not p.name.startswith("model")}
    assert names == {
        p.name for p in (tmp_path / "full").iterdir() if not p.name.startswith("model")
    }
    gen = "generation_config.json"
    assert (tmp_path / "lean" / gen).read_text() == (tmp_path / "full" / gen).read_text()
    if sharded:
        assert len(list((tmp_path / "lean").glob("model-*.safetensors"))) > 1
    ea = load_file(str(tmp_path / "lean" / EXPERTS_FILE))
    eb = load_file(str(tmp_path / "full" / EXPERTS_FILE))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[key], eb[key]) for key in ea)


def test_streaming_refuses_missing_block_tensor(tmp_path: Path) -> None:
    """A source lacking a block tensor is refused before anything is written."""
    from safetensors.torch import save_file

    src = save_tiny("llama", tmp_path / "src")
    state = tensors(src)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj"):
        export(str(src), PROMPTS, 0.5, out=tmp_path / "out", streaming=True)
    assert not (tmp_path / "out").exists()


def test_shard_writer_round_trip(tmp_path: Path) -> None:
    """Tensors put out of order land in order; the reader reads them back exactly."""
    values = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4, 2).to(torch.bfloat16),
    }
    entries = [(key, tuple(v.shape), v.dtype) for key, v in values.items()]
    writer = ShardWriter(tmp_path, entries, max_shard_size=70, total_parameters=34)
    for key in ("c", "b", "a"):
        writer.put(key, values[key])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = SafetensorsReader.open(tmp_path)
    for key, value in values.items():
        assert torch.equal(reader.get(key), value)
        assert torch.equal(reader.map(key), value)
    copy = tmp_path / "copy"
    copy.mkdir()
    again = ShardWriter(copy, entries, max_shard_size=70, total_parameters=34)
    for key in ("b", "c", "a"):  # copied through in 8-byte pieces, out of order
        again.put_lazy(key, lambda key=key: reader.chunks(key, chunk_bytes=8))
    again.close()
    reader.close()
    for path in sorted(tmp_path.glob("*.safetensors")):
        assert (copy / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streaming_with_memory_mapped_non_block_tensors(
    tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every non-block tensor memory-mapped (as the embedding is on real models), the
    export is still bit-identical to the in-memory path."""
    monkeypatch.setattr(streaming, "MAP_AT_BYTES", 0)
    seen: list[set[str]] = []
    original = streaming.load_streamed

    def spy(*args: object, **kwargs: object) -> streaming.StreamedModel:
        streamed = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(set(streamed.mapped))
        return streamed

    # the pipeline module (griffin_export.build.export is shadowed by the function of that name)
    monkeypatch.setattr(sys.modules["griffin_export.build.export"], "load_streamed", spy)
    assert_same_export(tmp_path, tiny_model("llama", tie_word_embeddings=tied), True, PROMPTS)
    assert seen and "model.embed_tokens.weight" in seen[0]


def test_shard_writer_reports_a_failed_write(tmp_path: Path) -> None:
    """A tensor that does not match the plan fails on the writer's thread; close raises it
    and abort afterwards is harmless."""
    writer = ShardWriter(tmp_path, [("a", (2, 2), torch.float32)], 1 << 20, 4)
    writer.put("a", torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="planned"):
        writer.close()
    writer.abort()


def test_streaming_progress_advances_per_layer(tmp_path: Path) -> None:
    """The streaming export reports its write stage once per decoder layer, in order, out of
    the number of layers (the CLI's bar then moves while the model streams). Catches a
    write stage reported only as 0/1 before and 1/1 after the whole pass."""
    src = save_tiny("llama", tmp_path / "src")
    events: list[tuple[str, int, int]] = []
    result = export(
        str(src),
        PROMPTS,
        0.5,
        out=tmp_path / "out",
        streaming=True,
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    n = result.n_layers
    assert n > 1
    writes = [(done, total) for stage, done, total in events if stage == "write"]
    assert writes == [(0, n), *[(i, n) for i in range(1, n + 1)], (n, n)]
