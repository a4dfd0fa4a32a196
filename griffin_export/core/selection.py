"""Choose the experts (kept FF neurons) of every layer from prompts: statistic, top-k and
compensation's refit, one layer at a time (:class:`LayerSelector`).

:func:`choose_experts` (statistic, finite check, top-k) is the one step from summed squares
to experts: :class:`LayerSelector` (``griffin export`` and the in-memory selection), the ppl
protocols' masks, the class-mode evaluation and the refresh runtime all call it, so they
measure the same product and all refuse an inf/nan statistic the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from griffin_export.core.activations import run_layer_major
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import (
    Compensation,
    GramStats,
    Refit,
    Regression,
    apply_stored,
)
from griffin_export.core.scoring import (
    check_sizes,
    griffin_statistic,
    normalized_square_sum,
    top_k_indices,
)
from griffin_export.errors import UsageError


@dataclass
class Selection:
    """Experts chosen for every layer.

    Attributes:
        keep: per layer, ``[k]`` int64 neuron indices, sorted ascending.
        scores: per layer, the ``[d_ff]`` float32 GRIFFIN statistic.
        d_ff: full FF width.
        tokens: prompt tokens the statistic pooled.
    """

    keep: list[Tensor]
    scores: list[Tensor]
    d_ff: int
    tokens: int

    @property
    def k_per_layer(self) -> list[int]:
        return [int(k.numel()) for k in self.keep]

    def index_map(self) -> dict[str, Tensor]:
        """The kept-index map (``griffin_experts.safetensors``): ``layer.<i>`` -> its kept
        neuron indices, int32."""
        return {f"layer.{i}": k.to(torch.int32).cpu() for i, k in enumerate(self.keep)}


#: ``on_layer(layer, keep, regression)``: layer ``layer``'s experts are chosen; with
#: compensation, ``regression`` is its refit's weight-independent part (the dropped neurons
#: regressed on the kept ones over the prompts' tokens; :func:`~griffin_export.core.
#: compensation.apply_stored` turns it and the down weight into the refit), else ``None``.
LayerDone = Callable[[int, Tensor, Regression | None], None]


class LayerSelector:
    """Selection (and compensation's regression) of every layer from its down-projection
    inputs, fed layer-major (:func:`~griffin_export.core.activations.run_layer_major`): the
    one statistic path of the in-memory and the streaming export.

    :meth:`add` takes one prompt's ``z`` for one layer. When a layer has seen all ``prompts``,
    its statistic is finished and checked, its ``ks[layer]`` experts chosen, with an active
    ``compensation`` the refit's regression solved on the pooled tokens, and ``on_layer``
    called; that layer's activations (and Gram statistics) are then dropped. Nothing is kept
    per layer beyond the scores and the kept indices.
    """

    def __init__(
        self,
        ks: Sequence[int],
        prompts: int,
        dtype: torch.dtype,
        on_layer: LayerDone,
        compensation: Compensation | None = None,
    ) -> None:
        self.ks = list(ks)
        self.prompts = prompts
        self.dtype = dtype
        self.on_layer = on_layer
        self.how = compensation if compensation is not None and compensation.active else None
        n_layers = len(self.ks)
        self.keep: list[Tensor] = [torch.zeros(0, dtype=torch.long)] * n_layers
        self.scores: list[Tensor] = [torch.zeros(0)] * n_layers
        self._sums: dict[int, Tensor] = {}
        self._seen: dict[int, int] = {}
        self._grams: dict[int, GramStats] = {}

    def add(self, layer: int, z: Tensor) -> None:
        """One prompt's down-projection inputs ``z`` (``[..., d_ff]``) of ``layer``."""
        part = normalized_square_sum(z)
        current = self._sums.get(layer)
        self._sums[layer] = part if current is None else current + part
        if self.how is not None:
            stats = self._grams.get(layer)
            if stats is None:
                stats = self._grams[layer] = GramStats.zeros(z.shape[-1], z.device)
            stats.add(z)
        self._seen[layer] = self._seen.get(layer, 0) + 1
        if self._seen[layer] == self.prompts:
            self._finish(layer)

    def _finish(self, layer: int) -> None:
        scores, keep = choose_experts(self._sums.pop(layer), self.ks[layer], layer, self.dtype)
        self.scores[layer], self.keep[layer] = scores, keep
        stats = self._grams.pop(layer, None)
        regression = None
        if self.how is not None and stats is not None:
            regression = stats.regression(keep.to(stats.device), self.how.alpha, self.how.bias)
        del stats  # the layer's rows (or Gram matrix) go here
        self.on_layer(layer, keep, regression)

    def selection(self, d_ff: int, tokens: int) -> Selection:
        """The finished :class:`Selection` (every layer must be done)."""
        if any(self._seen.get(layer, 0) < self.prompts for layer in range(len(self.ks))):
            raise UsageError(
                f"selection() before every layer saw all {self.prompts} prompt(s); feed every "
                "layer's down-projection inputs to add() first (run_layer_major)"
            )
        return Selection(keep=list(self.keep), scores=list(self.scores), d_ff=d_ff, tokens=tokens)


def select_experts(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    ratio: float | None = None,
    multiple_of: int = 1,
    on_prompt: Callable[[int], None] | None = None,
    k_per_layer: Sequence[int] | None = None,
    compensation: Compensation | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> Selection:
    """Run ``prompts`` (token-id tensors) through the full ``model`` and keep, in layer
    ``l``, the ``k_per_layer[l]`` neurons with the largest statistic pooled over all prompt
    tokens. Without ``k_per_layer``, ``ratio`` (and ``multiple_of``) give the uniform
    per-layer widths (:func:`griffin_export.core.budgets.layer_sizes`, the one place where a
    ratio becomes widths).

    With an active ``compensation`` every layer's down projection is also refitted on the
    prompt, in place: the refitted columns are written over the kept columns of the
    full-width weight (:func:`write_refit`; slicing then keeps exactly those values), each
    layer as soon as all prompts have passed it, so only one layer's prompt activations are
    held at a time. Later layers are still selected on the unrefitted model. This writes into
    the caller's ``model`` as it goes: if a later layer fails (a non-finite statistic, Ctrl-C)
    the layers before it stay refitted, so discard the model (or reload it) after an error.

    ``on_prompt(i)`` is called when prompt ``i`` has passed every layer (layer-major, so all
    prompts finish together at the last layer); ``on_layer(l)`` when layer ``l``'s experts
    are chosen (every prompt has passed it): the progress that advances through the run.
    """
    d_ff = spec.d_ff(model.config)
    blocks = spec.blocks(model)
    n_layers = len(blocks)
    if k_per_layer is None:
        if ratio is None:
            raise UsageError("select_experts needs k_per_layer or a ratio; e.g. ratio=0.5")
        k_per_layer = layer_sizes("uniform", n_layers, d_ff, ratio, multiple_of)
    ks = check_sizes(k_per_layer, n_layers, d_ff)
    ids = [p for p in prompts if p.numel()]
    if not ids:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    first = next(model.parameters())
    # A refit is written once its layer's down projection has run for the last prompt (the
    # forward must see the full model): after that module's forward, or after the run.
    pending: dict[int, tuple[Tensor, Regression]] = {}

    def chosen(layer: int, keep: Tensor, regression: Regression | None) -> None:
        if regression is not None:
            pending[layer] = (keep, regression)
        if on_layer is not None:
            on_layer(layer)

    def write_pending(layer: int) -> None:
        if layer in pending:
            keep, regression = pending.pop(layer)
            weight = _down_weight(spec, blocks[layer]).data
            write_refit(spec, model, layer, keep, apply_stored(regression, weight, spec.transposed))

    selector = LayerSelector(ks, len(ids), first.dtype, chosen, compensation)
    handles = [
        spec.down_module(block).register_forward_hook(
            lambda _m, _a, _o, layer=layer: write_pending(layer)
        )
        for layer, block in enumerate(blocks)
    ]
    try:
        tokens = run_layer_major(spec, model, ids, selector.add, first.device, on_prompt)
    finally:
        for handle in handles:
            handle.remove()
    for layer in list(pending):
        write_pending(layer)
    return selector.selection(d_ff, tokens)


def _down_weight(spec: ArchSpec, block: nn.Module) -> Tensor:
    weight = spec.down_module(block).weight
    assert isinstance(weight, Tensor)
    return weight


@torch.no_grad()
def write_refit(spec: ArchSpec, model: nn.Module, layer: int, keep: Tensor, refit: Refit) -> None:
    """Write layer ``layer``'s refitted down columns over the kept columns of its full-width
    down weight (and add the refit's bias to the down bias)."""
    block = spec.blocks(model)[layer]
    down, weight = spec.down_module(block), _down_weight(spec, block)
    index = keep.to(weight.device)
    weight.data.index_copy_(spec.neuron_axis("down"), index, refit.weight.to(weight.device))
    bias = getattr(down, "bias", None)
    if refit.bias is not None and isinstance(bias, Tensor):
        bias.data.copy_(bias.data + refit.bias.to(bias.device))


def choose_experts(sums: Tensor, k: int, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s GRIFFIN statistic and its ``k`` experts from ``sums`` (``[d_ff]``,
    :func:`~griffin_export.core.scoring.normalized_square_sum` summed over the tokens looked
    at): ``(scores, keep)``, ``keep`` sorted ascending (:func:`top_k_indices`).

    ``UsageError`` (one line naming ``dtype`` and the fix) if the statistic holds inf/nan:
    nan sorts first, so top-k would silently keep nan neurons. ``dtype`` is the model's (the
    one that overflowed)."""
    scores = griffin_statistic(sums, accumulated=True)
    check_finite_scores(scores, layer, dtype)
    return scores, top_k_indices(scores, k)


def check_finite_scores(scores: Tensor, layer: int, dtype: torch.dtype) -> None:
    """Refuse a statistic with inf/nan in it: the activations overflowed the model's dtype
    (float16 has a small range), and top-k of nan silently keeps neurons 0..k-1."""
    if bool(torch.isfinite(scores).all()):
        return
    raise UsageError(non_finite_message(f"layer {layer}'s FF activations", dtype))


def non_finite_message(what: str, dtype: torch.dtype) -> str:
    """One line for inf/nan values: the dtype that overflowed and one that works."""
    name = str(dtype).removeprefix("torch.")
    if dtype in (torch.float16, torch.bfloat16):
        works = "bfloat16 or float32" if dtype == torch.float16 else "float32"
        return (
            f"{what} are not finite in {name} (the model overflows it); "
            f"use --dtype {works} (re-export with it for an export)"
        )
    return f"{what} are not finite in {name}; the weights hold inf/nan: re-download the model"
