"""Non-uniform exports (griffin_export.formats.layout): round trip, stock refusal, uniform
unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from griffin_export.core.architectures import spec_for
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.selection import select_experts
from griffin_export.errors import ExportFormatError
from griffin_export.formats.layout import (
    checkpoint_ff_sizes,
    load_pretrained,
    per_layer_sizes,
    prune_model_per_layer,
)

from tiny import D_FF, LAYERS, random_ids, tiny_model

ARCHS = ["llama", "phi3", "gpt2", "opt"]  # plain GLU, fused gate_up, Conv1D, bias + no mlp


def _pruned(model_type: str, ratio: float = 0.8):
    """A tiny model pruned in memory to the ``protect`` budget (sizes [37, 16, 37])."""
    model = tiny_model(model_type)
    spec = spec_for(model_type)
    sizes = layer_sizes("protect", LAYERS, D_FF, ratio)
    selection = select_experts(spec, model, [random_ids(40, seed=1)], ratio, k_per_layer=sizes)
    prune_model_per_layer(spec, model, selection.keep)
    return model, spec, sizes


@pytest.mark.parametrize("model_type", ARCHS)
def test_non_uniform_round_trip(model_type: str, tmp_path: Path) -> None:
    model, spec, sizes = _pruned(model_type)
    assert len(set(sizes)) > 1
    model.save_pretrained(tmp_path)
    assert per_layer_sizes(model.config) == sizes
    assert checkpoint_ff_sizes(tmp_path, spec, LAYERS) == sizes
    loaded = load_pretrained(tmp_path)
    ids = random_ids(23, seed=5).reshape(1, -1)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert per_layer_sizes(loaded.config) == sizes


def test_stock_from_pretrained_refuses_non_uniform(tmp_path: Path) -> None:
    model, _, _ = _pruned("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_modified_sizes_are_refused(tmp_path: Path) -> None:
    import json

    model, _, sizes = _pruned("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["griffin"]["intermediate_sizes"] = [sizes[1], sizes[0], *sizes[2:]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match="FF widths"):
        load_pretrained(tmp_path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    from griffin_export.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_pretrained(tmp_path / "nope")
