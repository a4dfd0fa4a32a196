"""Capture the inputs of every layer's down projection while a prompt runs through the model.

One hook for every job that looks at them: selection observes and accumulates (choosing neurons
is :mod:`griffin_export.core.scoring`'s job); the evaluation protocols also replace them (a
masked or refitted input is exactly a pruned layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec
from griffin_export.core.scoring import normalized_square_sum


@dataclass
class LayerStatistics:
    """Per-layer running ``sum_t z~_t^2`` (float32, ``[d_ff]`` each) and the token count."""

    sums: list[Tensor]
    tokens: int = 0


@contextmanager
def capture_down_inputs(
    spec: ArchSpec, model: nn.Module, sink: Callable[[int, Tensor], Tensor | None]
) -> Iterator[None]:
    """Call ``sink(layer_index, z)`` with each down projection's input during forwards.

    ``z`` is ``[batch, seq, d_ff]`` as the module receives it; hooks are removed on exit. A
    sink that returns a tensor replaces ``z`` with it (same shape): the down projection runs
    on that instead.
    """
    handles = []
    for index, block in enumerate(spec.blocks(model)):

        def hook(
            _module: nn.Module, args: tuple[Tensor, ...], index: int = index
        ) -> tuple[Tensor, ...] | None:
            replaced = sink(index, args[0])
            return None if replaced is None else (replaced, *args[1:])

        handles.append(spec.down_module(block).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by the last layer's hook to end a forward early."""


@torch.inference_mode()
def collect_statistics(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Iterable[Tensor],
    on_prompt: Callable[[int], None] | None = None,
    also: Callable[[int, Tensor], None] | None = None,
) -> LayerStatistics:
    """Run each prompt (``[seq]`` or ``[1, seq]`` token ids) through ``model`` and pool the
    normalised squared down-projection inputs of all their tokens, per layer.

    Prompts run one at a time (no padding enters the statistic). ``on_prompt(i)`` is called
    after prompt ``i`` so callers can show progress; ``also(layer, z)`` sees every layer's
    down-projection input too (compensation accumulates its Gram matrices there).
    """
    n_layers = len(spec.blocks(model))
    stats = LayerStatistics(sums=[torch.zeros(0)] * n_layers)
    device = next(model.parameters()).device

    def sink(index: int, z: Tensor) -> None:
        part = normalized_square_sum(z)
        current = stats.sums[index]
        stats.sums[index] = part if current.numel() == 0 else current + part
        if also is not None:
            also(index, z)
        if index == n_layers - 1:
            # Nothing after the last down projection's input matters for selection: skip the
            # rest of the forward (the last FF output and the vocabulary-sized logits).
            raise _StopForward

    with capture_down_inputs(spec, model, sink):
        for i, ids in enumerate(prompts):
            ids = ids.reshape(1, -1).to(device)
            with suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
            stats.tokens += ids.shape[1]
            if on_prompt is not None:
                on_prompt(i)
    return stats
