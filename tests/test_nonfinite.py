"""An inf/nan GRIFFIN statistic is refused the same way on every selection path: the export's
(select_experts), the ppl protocols' masks, class-mode evaluation and the refresh runtime.
nan sorts first in a descending sort, so a path without the check silently keeps the nan
neurons."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import griffin_export.runtime.refresh as refresh_mod
from griffin_export import export, select_experts, spec_for
from griffin_export.errors import UsageError
from griffin_export.evaluation.eval_modes import PromptExperts
from griffin_export.evaluation.protocols import Setting, ff_setting
from griffin_export.runtime.refresh import GriffinRuntime

from tiny import random_ids, save_tiny, tiny_model

LAYER = 1  # the layer whose down-projection input gets an inf
WANT = "layer 1's FF activations are not finite in float32"


@contextmanager
def inf_in_layer(spec: Any, model: torch.nn.Module) -> Iterator[None]:
    """Put an inf into neuron 3 of layer ``LAYER``'s down-projection input (the statistic of
    a token with an inf is nan: inf / inf)."""

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        z = args[0].clone()
        z[..., 3] = float("inf")
        return (z, *args[1:])

    handle = spec.down_module(spec.blocks(model)[LAYER]).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _model() -> tuple[Any, torch.nn.Module, torch.Tensor]:
    model = tiny_model("llama")
    return spec_for("llama"), model, random_ids(12)[None]


def _refused(error: pytest.ExceptionInfo[UsageError]) -> None:
    message = str(error.value)
    assert WANT in message and "\n" not in message, message


def test_export_selection_refuses_a_nan_statistic() -> None:
    """select_experts (LayerSelector). Catches dropping the finite check from the export."""
    spec, model, ids = _model()
    with inf_in_layer(spec, model), pytest.raises(UsageError) as error:
        select_experts(spec, model, [ids[0]], ratio=0.5)
    _refused(error)


@pytest.mark.parametrize("compensate", ["none", "refit"])
def test_ppl_griffin_mask_refuses_a_nan_statistic(compensate: str) -> None:
    """The ppl protocols' per-segment experts (griffin_mask and, with compensation,
    griffin_refit_input). Catches top-k of the nan statistic silently keeping neuron 3."""
    spec, model, ids = _model()
    setting = Setting("g", "griffin", k=[18] * 3, compensate=compensate)
    with (
        inf_in_layer(spec, model),
        ff_setting(spec, model, setting, prompt_len=8),
        pytest.raises(UsageError) as error,
        torch.no_grad(),
    ):
        model(input_ids=ids)
    _refused(error)


def test_class_mode_experts_refuse_a_nan_statistic() -> None:
    """PromptExperts (class-mode evaluation). Catches a prefill choice without the check."""
    spec, model, ids = _model()
    with (
        inf_in_layer(spec, model),
        PromptExperts(spec, model, [18] * 3),
        pytest.raises(UsageError) as error,
        torch.no_grad(),
    ):
        model(input_ids=ids)
    _refused(error)


def test_runtime_refresh_refuses_a_nan_statistic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GriffinRuntime.refresh scoring the ring from the original's weights. Catches a refresh
    that swaps the nan neurons in."""
    src = save_tiny("llama", tmp_path / "src")
    out = export(str(src), ["The river runs to the sea."], 0.5, out=tmp_path / "exp").out_dir
    runtime = GriffinRuntime.from_export(out)
    real = refresh_mod.full_activations

    def with_inf(spec: Any, act: Any, full: Any, x: torch.Tensor) -> torch.Tensor:
        z = real(spec, act, full, x)
        if full is runtime._full[LAYER]:
            z = z.clone()
            z[..., 3] = float("inf")
        return z

    monkeypatch.setattr(refresh_mod, "full_activations", with_inf)
    with pytest.raises(UsageError) as error:
        runtime.generate("The fox", max_new_tokens=6, refresh_every=2)
    _refused(error)
