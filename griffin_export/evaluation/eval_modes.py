"""The FF protocols of ``griffin eval`` as settings and hooks: which columns a report has
(:class:`EvalSetting`), GRIFFIN's classification mode (experts from every position but the
last) and generation mode (experts from the prompt, pruned decoding, optional refresh).
Shared by :mod:`griffin_export.evaluation.taskeval` (which runs the tasks) and
:mod:`griffin_export.evaluation.lmeval_bridge` (the lm-eval model class that applies them)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import (
    DEFAULT_ALPHA,
    DEFAULT_METHOD,
    check_method,
    default_alpha,
)
from griffin_export.core.moe import is_moe_layer
from griffin_export.core.moe_selection import MoeSizes, plan_moe_sizes
from griffin_export.core.schedule import RefreshSchedule
from griffin_export.core.scoring import normalized_squares
from griffin_export.core.selection import choose_experts
from griffin_export.errors import UsageError
from griffin_export.evaluation.moe_protocol import PrunedPositions, choose_from_prompt
from griffin_export.evaluation.protocols import Setting, ff_setting

MODES = ("static", "class", "gen")
#: lm-eval request types each mode can serve (multiple_choice tasks send loglikelihood).
SERVES = {
    "static": ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until"),
    "class": ("loglikelihood", "multiple_choice"),
    "gen": ("generate_until",),
}


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSetting:
    """One column of the report.

    ``protocol``: ``plain`` (the model as it is, any request type), ``class`` or ``gen`` (the
    modes above; ``k`` None runs the same protocol unpruned, i.e. the full model).
    ``model``: ``full`` (the full model), or the name of the export it runs.
    ``experts``/``moe``: on a mixture of experts, the fraction of routed experts kept and the
    kept sizes; each request's context chooses experts and neurons as ``griffin export``
    does (:mod:`griffin_export.evaluation.moe_protocol`).
    """

    name: str
    protocol: str
    model: str = "full"
    ratio: float | None = None
    budget: str | None = None
    k: tuple[int, ...] | None = None
    refresh: int = 0
    window: int | None = None
    compensate: str = "none"
    alpha: float | None = None
    experts: float | None = None
    moe: MoeSizes | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["k_per_layer"] = list(data.pop("k")) if self.k is not None else None
        return data


def compensation_for(mode: str, compensate: str | None) -> str:
    """The compensation ``mode`` runs: ``compensate``, or with None its default there
    (:data:`~griffin_export.core.compensation.DEFAULT_METHOD` in class mode, as ``griffin
    export`` and ``griffin ppl``; none elsewhere). A method other than none is refused
    outside class mode (gen decodes a plain slice; static runs exports as they were made)."""
    if compensate is None:
        return DEFAULT_METHOD if mode == "class" else "none"
    check_method(compensate)
    if compensate != "none" and mode == "static":
        raise UsageError(
            f"--compensate {compensate} does not apply to --mode static: an export carries its "
            "own (griffin export --compensate); drop the option"
        )
    if compensate != "none" and mode != "class":
        raise UsageError(
            f"--compensate {compensate} applies to --mode class only; drop it for --mode {mode}"
        )
    return compensate


def adaptive_settings(
    mode: str,
    n_layers: int,
    d_ff: int,
    ratios: Sequence[float],
    budgets: Sequence[str],
    refresh: int = 0,
    window: int | None = None,
    check: bool = False,
    compensate: str | None = None,
    alpha: float | None = None,
) -> list[EvalSetting]:
    """``class``/``gen``: the full model, then one setting per ratio and budget (and with
    ``check`` a ratio-1.0 setting named ``check r=1``). ``compensate`` (class mode only) refits
    the kept neurons' down columns on the positions that chose them, as ``griffin ppl`` does;
    None means the method's default where it applies
    (:data:`~griffin_export.core.compensation.DEFAULT_METHOD` for class, none for gen).
    ``alpha`` None means :func:`~griffin_export.core.compensation.default_alpha` of each ratio."""
    compensate = compensation_for(mode, compensate)
    settings = [EvalSetting("full", mode)]
    for ratio in ratios:
        for budget in budgets:
            k = tuple(layer_sizes(budget, n_layers, d_ff, ratio))
            name = f"{mode} r={ratio:g}" + ("" if budget == "uniform" else f" {budget}")
            name += f" refresh={refresh}" if refresh else ""
            name += f" {compensate}" if compensate != "none" else ""
            how = default_alpha(ratio) if alpha is None else alpha
            settings.append(
                EvalSetting(
                    name,
                    mode,
                    "full",
                    ratio,
                    budget,
                    k,
                    refresh,
                    window,
                    compensate,
                    how if compensate != "none" else None,
                )
            )
    if check:
        k = tuple(layer_sizes("uniform", n_layers, d_ff, 1.0))
        settings.append(EvalSetting("check r=1", mode, "full", 1.0, "uniform", k))
    return settings


def moe_adaptive_settings(
    mode: str,
    spec: ArchSpec,
    model: nn.Module,
    ratios: Sequence[float],
    experts: float,
    check: bool = False,
    compensate: str | None = None,
    alpha: float | None = None,
) -> list[EvalSetting]:
    """``class``/``gen`` on a mixture of experts: the full model, then one setting per ratio
    keeping ``experts`` of the routed experts per layer and ``ratio`` of every FF's neurons
    (:func:`~griffin_export.core.moe_selection.plan_moe_sizes`); with ``check`` a setting
    named ``check r=1`` keeping every expert and neuron. ``compensate`` as in
    :func:`adaptive_settings` (class mode only)."""
    compensate = compensation_for(mode, compensate)
    settings = [EvalSetting("full", mode)]
    wanted = [(f"{mode} r={r:g} experts={experts:g}", r, experts) for r in ratios]
    if check:
        wanted.append(("check r=1", 1.0, 1.0))
    for name, ratio, share in wanted:
        sizes = plan_moe_sizes(spec, model, ratio, share)
        k = tuple(
            sizes.width if is_moe_layer(spec, b) else int(sizes.dense or 0)
            for b in spec.blocks(model)
        )
        how = compensate if name != "check r=1" else "none"
        settings.append(
            EvalSetting(
                name + (f" {how}" if how != "none" else ""),
                mode,
                "full",
                ratio,
                "uniform",
                k,
                compensate=how,
                alpha=(default_alpha(ratio) if alpha is None else alpha) if how != "none" else None,
                experts=share,
                moe=sizes,
            )
        )
    return settings


# -- class mode: experts from all positions but the last ------------------------------------------


def class_mode(
    spec: ArchSpec,
    model: nn.Module,
    k: Sequence[int],
    length: int,
    compensate: str = "none",
    alpha: float | None = None,
    moe: MoeSizes | None = None,
    ids: Tensor | None = None,
) -> AbstractContextManager[None]:
    """Hooks making a forward of ``model`` over ``length`` >= 2 positions (batch 1) run GRIFFIN's
    classification mode: layer ``l`` keeps the top ``k[l]`` neurons of the statistic over
    positions ``0..length-2``, applied at position ``length-1`` only. This is the ``griffin``
    perplexity protocol of :mod:`griffin_export.evaluation.protocols` with a prompt of ``length-1``
    tokens, whose hooks it installs. With ``compensate`` the last position runs the kept
    neurons with their down columns refitted on the earlier positions (ridge ``alpha``).
    On a mixture of experts (``moe``, the kept sizes), the earlier positions of ``ids``
    ``[1, length]`` choose experts and neurons as ``griffin export`` does."""
    how = DEFAULT_ALPHA if alpha is None else alpha
    setting = Setting("class", "griffin", k=list(k), compensate=compensate, alpha=how, moe=moe)
    return ff_setting(spec, model, setting, length - 1, ids)


def moe_prompt_experts(
    spec: ArchSpec, model: nn.Module, sizes: MoeSizes, ids: Tensor
) -> PrunedPositions:
    """``gen`` on a mixture of experts: the prompt ``ids`` ``[1, T]`` chooses every layer's
    experts and neurons through the full model, as ``griffin export`` does (no refit, as
    gen decodes a plain slice); the hooks returned let the first forward (the prefill) run
    the full model and every later one run the sliced layers."""
    choice = choose_from_prompt(spec, model, ids[0], sizes)
    return PrunedPositions(spec, model, [choice], 0, skip_first=True, reuse=True)


# -- gen mode: experts from the prompt, pruned decoding -------------------------------------------


class PromptExperts:
    """Hooks for ``gen``: the first forward (the prefill, batch 1) runs the full FF and
    chooses layer ``l``'s top ``k[l]`` neurons from all its positions; every later forward
    (one decoded token each) runs with only those. With ``refresh`` N the experts are
    re-chosen on the refresh runtime's schedule and from its statistic
    (:class:`~griffin_export.core.schedule.RefreshSchedule`, origin at the prompt's last
    position): before the forward of generated token j (j a multiple of N), from the last
    ``window`` positions run so far (all of them if None).
    """

    def __init__(
        self,
        spec: ArchSpec,
        model: nn.Module,
        k: Sequence[int],
        refresh: int = 0,
        window: int | None = None,
    ) -> None:
        self.spec, self.model, self.k = spec, model, list(k)
        self.schedule = RefreshSchedule(refresh, window)
        n = len(self.k)
        self.keep: list[Tensor | None] = [None] * n
        self.history: list[Tensor | None] = [None] * n  # [positions, d_ff] float32 squares
        self.steps = [0] * n
        self._hooks = ExitStack()

    def __enter__(self) -> PromptExperts:
        self._hooks.enter_context(capture_down_inputs(self.spec, self.model, self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.close()

    def _choose(self, layer: int, squares: Tensor, dtype: torch.dtype) -> Tensor:
        keep = torch.zeros(squares.shape[-1])
        keep[choose_experts(squares.sum(dim=0), self.k[layer], layer, dtype)[1]] = 1
        return keep

    def _remember(self, layer: int, squares: Tensor) -> None:
        """Keep the rows the next refresh looks back on (none without refresh)."""
        if not self.schedule.every:
            return
        past = self.history[layer]
        rows = squares if past is None else torch.cat([past, squares])
        start, _ = self.schedule.look_back(rows.shape[0])  # as seen from the next position
        self.history[layer] = rows[start:]

    def _hook(self, layer: int, z: Tensor) -> Tensor | None:
        squares = normalized_squares(z)  # z: [1, T, d_ff]; squares [T, d_ff] float32
        keep = self.keep[layer]
        if keep is None:  # the prefill: full FF, choose from every prompt position
            self.keep[layer] = self._choose(layer, squares, z.dtype)
            self._remember(layer, squares)
            return None
        self.steps[layer] += 1
        history = self.history[layer]
        if self.schedule.due(self.steps[layer]) and history is not None:
            keep = self.keep[layer] = self._choose(layer, history, z.dtype)
        self._remember(layer, squares)
        return z * keep.to(z.device, z.dtype)
