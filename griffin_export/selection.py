"""Choose the experts (kept FF neurons) of every layer from a prompt: hooks + statistic + top-k.

This is the one selection routine shared by ``griffin export``, ``griffin ppl`` and the
refresh runtime, so they all measure the same product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .activations import collect_statistics
from .architectures import ArchSpec
from .errors import UsageError
from .scoring import griffin_statistic, keep_count, top_k_indices


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


def select_from_scores(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Top-``k`` of every layer's statistic (ties to the lower index, sorted ascending)."""
    return [top_k_indices(s, k) for s in scores]


def select_experts(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    ratio: float,
    multiple_of: int = 1,
    on_prompt: Callable[[int], None] | None = None,
) -> Selection:
    """Run ``prompts`` (token-id tensors) through the full ``model`` and keep, in every FF
    layer, the ``keep_count(d_ff, ratio, multiple_of)`` neurons with the largest statistic,
    pooled over all prompt tokens.
    """
    d_ff = spec.d_ff(model.config)
    k = keep_count(d_ff, ratio, multiple_of)
    if not prompts or all(p.numel() == 0 for p in prompts):
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    stats = collect_statistics(spec, model, [p for p in prompts if p.numel()], on_prompt)
    scores = [griffin_statistic(s, accumulated=True) for s in stats.sums]
    return Selection(
        keep=select_from_scores(scores, k), scores=scores, d_ff=d_ff, tokens=stats.tokens
    )
