"""The streaming export is bit-identical to the in-memory one, on every architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from griffin_export import export
from griffin_export.export import EXPERTS_FILE, MANIFEST

from tiny import MODEL_TYPES, char_tokenizer, tiny_model

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
    src = tmp_path / "src"
    model = tiny_model(model_type)
    model.save_pretrained(src, max_shard_size="20KB" if sharded else "5GB")
    char_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file() == sharded

    shard = "30KB" if sharded else "5GB"
    lean = export(
        str(src), PROMPTS, 0.4, out=tmp_path / "lean", streaming=True, max_shard_size=shard
    )
    full = export(
        str(src), PROMPTS, 0.4, out=tmp_path / "full", streaming=False, max_shard_size=shard
    )

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
    if sharded:
        assert len(list((tmp_path / "lean").glob("model-*.safetensors"))) > 1
    ea = load_file(str(tmp_path / "lean" / EXPERTS_FILE))
    eb = load_file(str(tmp_path / "full" / EXPERTS_FILE))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[key], eb[key]) for key in ea)
