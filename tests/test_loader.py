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
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.layout import (
    checkpoint_ff_sizes,
    load_pretrained,
    per_layer_sizes,
    prune_model_per_layer,
)
from griffin_export.storage.loading import device_for, move_to_device

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
    from griffin_export.errors import UsageError

    with pytest.raises(UsageError, match=r"config\.json"):
        load_pretrained(tmp_path / "nope")


def test_per_layer_export_keeps_its_generation_config(tmp_path: Path) -> None:
    """A non-uniform export loads with the end tokens of its own generation_config.json.
    Catches building it with ``from_config`` alone, which derives a generation config from
    config.json and drops a list of end tokens (generation then runs past them)."""
    model, _, _ = _pruned("llama")
    model.generation_config.eos_token_id = [2, 5]
    model.save_pretrained(tmp_path)
    assert load_pretrained(tmp_path).generation_config.eos_token_id == [2, 5]


def _failing_to(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """``nn.Module.to`` raising ``error`` for any device but the CPU (as on a GPU host)."""
    real = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and str(target) not in ("cpu", "meta"):
            raise error
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "to", to)


OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"


def test_out_of_memory_on_the_device_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA out-of-memory while moving a model is reported as out of memory on that device,
    with a smaller --dtype or cpu as the fix. Catches the old catch-all that called every
    failure "not usable here; use cpu" (wrong advice for a GPU that is merely full)."""
    _failing_to(monkeypatch, torch.OutOfMemoryError(OOM))
    with pytest.raises(UsageError, match=r"out of memory on --device 'cuda:1'.*--dtype.*cpu"):
        move_to_device(torch.nn.Linear(2, 2), "cuda:1")


def test_unusable_device_says_use_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch without CUDA (its AssertionError) and a device string torch does not know are
    "not usable here; use --device cpu", the cause quoted."""
    _failing_to(monkeypatch, AssertionError("Torch not compiled with CUDA enabled"))
    with pytest.raises(UsageError, match=r"'cuda' is not usable here \(Torch not compiled.*cpu"):
        move_to_device(torch.nn.Linear(2, 2), "cuda")
    with pytest.raises(UsageError, match=r"--device 'gpu' is not usable here .*--device cpu"):
        device_for("gpu")


def test_other_device_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that does not mean "this device cannot be used" is not turned into advice to
    use the CPU: it propagates as it is. Catches catching every ``Exception``."""
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    _failing_to(monkeypatch, error)
    with pytest.raises(RuntimeError) as caught:
        move_to_device(torch.nn.Linear(2, 2), "cuda")
    assert caught.value is error


@pytest.mark.parametrize("per_layer", [False, True], ids=["uniform", "per-layer"])
def test_load_pretrained_reports_out_of_memory(
    per_layer: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways load_pretrained builds a model go through the one device check (the stock
    path and the per-layer one)."""
    model = _pruned("llama")[0] if per_layer else tiny_model("llama")
    model.save_pretrained(tmp_path)
    _failing_to(monkeypatch, torch.OutOfMemoryError(OOM))
    with pytest.raises(UsageError, match="out of memory on --device 'cuda'"):
        load_pretrained(tmp_path, device="cuda")
