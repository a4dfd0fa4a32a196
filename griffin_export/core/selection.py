"""Choose the experts (kept FF neurons) of every layer from a prompt: hooks + statistic + top-k.

This is the one selection routine shared by ``griffin export``, ``griffin ppl`` and the
refresh runtime, so they all measure the same product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from griffin_export.core.activations import collect_statistics
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import LayerGrams
from griffin_export.core.scoring import check_sizes, griffin_statistic, top_k_indices
from griffin_export.errors import UsageError


@dataclass
class Selection:
    """Experts chosen for every layer.

    Attributes:
        keep: per layer, ``[k]`` int64 neuron indices, sorted ascending.
        scores: per layer, the ``[d_ff]`` float32 GRIFFIN statistic.
        d_ff: full FF width.
        tokens: prompt tokens the statistic pooled.
        grams: per layer, the prompt's Gram matrix (``gram=True``; compensation's input).
    """

    keep: list[Tensor]
    scores: list[Tensor]
    d_ff: int
    tokens: int
    grams: LayerGrams | None = None

    @property
    def k_per_layer(self) -> list[int]:
        return [int(k.numel()) for k in self.keep]


def select_experts(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    ratio: float | None = None,
    multiple_of: int = 1,
    on_prompt: Callable[[int], None] | None = None,
    k_per_layer: Sequence[int] | None = None,
    gram: bool = False,
) -> Selection:
    """Run ``prompts`` (token-id tensors) through the full ``model`` and keep, in layer
    ``l``, the ``k_per_layer[l]`` neurons with the largest statistic pooled over all prompt
    tokens. Without ``k_per_layer``, ``ratio`` (and ``multiple_of``) give the uniform
    per-layer widths (:func:`griffin_export.core.budgets.layer_sizes`, the one place where a
    ratio becomes widths). With ``gram`` also accumulate every layer's Gram matrix of
    down-projection inputs (``d_ff^2`` floats per layer), compensation's input.
    """
    d_ff = spec.d_ff(model.config)
    n_layers = len(spec.blocks(model))
    if k_per_layer is None:
        if ratio is None:
            raise UsageError("select_experts needs k_per_layer or a ratio; e.g. ratio=0.5")
        k_per_layer = layer_sizes("uniform", n_layers, d_ff, ratio, multiple_of)
    ks = check_sizes(k_per_layer, n_layers, d_ff)
    if not prompts or all(p.numel() == 0 for p in prompts):
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    grams = LayerGrams(n_layers, d_ff) if gram else None
    also = None if grams is None else grams.add
    stats = collect_statistics(spec, model, [p for p in prompts if p.numel()], on_prompt, also)
    scores = [griffin_statistic(s, accumulated=True) for s in stats.sums]
    for layer, layer_scores in enumerate(scores):
        check_finite_scores(layer_scores, layer, next(model.parameters()).dtype)
    keep = [top_k_indices(s, k) for s, k in zip(scores, ks, strict=True)]
    return Selection(keep=keep, scores=scores, d_ff=d_ff, tokens=stats.tokens, grams=grams)


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
