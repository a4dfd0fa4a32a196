"""The ``griffin`` protocol on mixtures of experts: experts and neurons chosen from a prompt,
the positions after it run through the pruned FF layers, in the same forward.

A prompt's choice is :func:`~griffin_export.core.moe_selection.select_moe`'s, on the full
model over the prompt alone (exactly what ``griffin export`` chooses from that prompt, refits
included). The pruned FF of a layer is not a mask imitating the export: it *is* the export's
layer, :func:`~griffin_export.core.moe_selection.prune_moe_layer` applied to a shallow copy
of the decoder block (:func:`shallow_copy`: every tensor shared, slicing replaces the copy's
tensors and leaves the model's alone), with the refitted down columns written into the
copy's sliced tensors. A forward hook on every layer's FF module (the sparse MoE block,
shared expert included, or a dense layer's MLP) replaces its output at positions
``>= start`` by that pruned module's output on the same inputs (it runs on all of the row's
positions, as the full module did, so that with nothing removed it equals the full module bit
for bit, and ``--check`` holds; outputs before ``start`` are dropped): the removed experts are out
of the routing because the copy's router rows are sliced, as in the export, and the dropped
neurons are gone from the copy's experts. Positions ``< start`` keep the full model's output,
so attention there (keys and values) is the full model's: the protocol's "the first P tokens
go through the full model". One layer's pruned copy exists at a time (``reuse`` keeps them
for decoding, where every forward is one token).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from griffin_export.core.architectures import ArchSpec
from griffin_export.core.compensation import Compensation, Refit
from griffin_export.core.moe import (
    dense_spec,
    expert_param,
    experts_of,
    moe_module,
    shared_spec,
)
from griffin_export.core.moe_selection import (
    DEFAULT_EXPERT_SCORE,
    LayerChoice,
    MoeLayerChoice,
    MoeSelection,
    MoeSizes,
    prune_moe_layer,
    select_moe,
    write_moe_refit,
)
from griffin_export.errors import UnsupportedArchitectureError

#: one layer's refits: per kept expert (original index) and the dense layer's or shared one
LayerRefits = tuple[dict[int, Refit], Refit | None]


@dataclass
class PromptChoice:
    """What one prompt chose in every layer, and the refits fitted on it (by layer)."""

    selection: MoeSelection
    refits: dict[int, LayerRefits] = field(default_factory=dict)


def choose_from_prompt(
    spec: ArchSpec,
    model: nn.Module,
    prompt: Tensor,
    sizes: MoeSizes,
    compensation: Compensation | None = None,
    expert_score: str = DEFAULT_EXPERT_SCORE,
) -> PromptChoice:
    """Every layer's experts and neurons chosen from ``prompt`` (``[T]`` token ids) through
    the full ``model``, as ``griffin export`` would from it; the refits of an active
    ``compensation`` are kept aside, ``model`` is left as it was."""
    refits: dict[int, LayerRefits] = {}

    def keep(layer: int, experts: dict[int, Refit], other: Refit | None) -> None:
        refits[layer] = (experts, other)

    selection = select_moe(
        spec,
        model,
        [prompt],
        sizes,
        compensation=compensation,
        expert_score=expert_score,
        on_refit=keep,
    )
    return PromptChoice(selection, refits)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and of all its submodules that shares every tensor with it but
    owns its parameter and buffer tables, its plain attributes, and no hooks. Slicing the
    copy in place (which replaces tensors, never writes into them) leaves ``module`` as it
    was; the copy costs no tensor memory until it is sliced."""
    if "forward" in module.__dict__:  # accelerate's offload hooks patch forward per instance
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} has a patched forward (a device map with offloading?); "
            "load the model on one device (--device) for the griffin protocol on experts"
        )
    out = copy.copy(module)
    out._parameters = type(module._parameters)(module._parameters)
    out._buffers = type(module._buffers)(module._buffers)
    out._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, value in list(out.__dict__.items()):
        if "hook" in name and isinstance(value, dict):
            out.__dict__[name] = type(value)()
    out._modules = type(module._modules)(
        (name, None if child is None else shallow_copy(child))
        for name, child in module._modules.items()
    )
    return out


def ff_module(spec: ArchSpec, block: nn.Module) -> nn.Module:
    """A decoder block's whole FF: the sparse MoE module (shared expert included), or a
    dense layer's MLP."""
    module = moe_module(spec, block)
    return module if module is not None else dense_spec(spec).mlp_module(block)


def pruned_ff(
    spec: ArchSpec,
    block: nn.Module,
    choice: LayerChoice,
    sizes: MoeSizes,
    refits: LayerRefits | None = None,
) -> nn.Module:
    """``block``'s FF as an export of ``choice`` has it: a shallow copy of ``block`` sliced
    by :func:`~griffin_export.core.moe_selection.prune_moe_layer`, with ``refits`` written
    over the kept columns (:func:`~griffin_export.core.moe_selection.write_moe_refit`)."""
    copied = shallow_copy(block)
    prune_moe_layer(spec, copied, choice, sizes)
    if refits is not None:
        _own_down_bias(spec, copied, choice)
        write_moe_refit(spec, copied, *_in_sliced_positions(spec, copied, choice, refits))
    return ff_module(spec, copied)


def _own_down_bias(spec: ArchSpec, block: nn.Module, choice: LayerChoice) -> None:
    """Slicing keeps a dense down projection's bias tensor itself; a refit adds to it, so
    the copy gets its own."""
    target = dense_spec(spec) if isinstance(choice, Tensor) else shared_spec(spec)
    if target is None or (not isinstance(choice, Tensor) and choice.shared is None):
        return
    down = target.down_module(block)
    bias = getattr(down, "bias", None)
    if isinstance(bias, Tensor):
        down.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def _in_sliced_positions(
    spec: ArchSpec, block: nn.Module, choice: LayerChoice, refits: LayerRefits
) -> tuple[LayerChoice, dict[int, Refit], Refit | None]:
    """``choice`` and its refits re-indexed for the sliced block: expert ``e`` is at its row
    among the kept ones, and every kept neuron at its column among the kept ones."""
    experts, other = refits
    if isinstance(choice, Tensor):
        return torch.arange(choice.numel()), {}, other
    device = expert_param(experts_of(spec, block), "down_proj").device
    kept, width = choice.neurons.shape
    row = {int(e): r for r, e in enumerate(choice.experts.tolist())}
    identity = MoeLayerChoice(
        experts=torch.arange(kept),
        neurons=torch.arange(width, device=device).expand(kept, width),
        shared=None if choice.shared is None else torch.arange(choice.shared.numel()),
        importance=choice.importance,
        mass=choice.mass,
        tokens=choice.tokens,
    )
    return identity, {row[e]: refit for e, refit in experts.items()}, other


class PrunedPositions:
    """Hooks (a context manager) making every FF layer of ``model`` run, at positions
    ``>= start`` of each forward, batch row ``b``'s pruned FF (``choices[b]``) instead of
    the full one. ``skip_first``: the first forward (a prefill) runs the full model, every
    later one is pruned from position ``start``; ``reuse`` keeps each row's pruned layers
    built (for decoding) instead of building each for one forward."""

    def __init__(
        self,
        spec: ArchSpec,
        model: nn.Module,
        choices: Sequence[PromptChoice],
        start: int,
        *,
        skip_first: bool = False,
        reuse: bool = False,
    ) -> None:
        self.spec, self.model = spec, model
        self.blocks = spec.blocks(model)
        self.choices = list(choices)
        self.start = start
        self.reuse = reuse
        self.skipping = [skip_first] * len(self.blocks)
        self.built: dict[tuple[int, int], nn.Module] = {}
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> PrunedPositions:
        for layer, block in enumerate(self.blocks):

            def hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                output: Any,
                layer: int = layer,
            ) -> Any:
                return self._splice(layer, args, kwargs, output)

            module = ff_module(self.spec, block)
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.built.clear()

    def _pruned(self, row: int, layer: int) -> nn.Module:
        module = self.built.get((row, layer))
        if module is None:
            choice = self.choices[row]
            module = pruned_ff(
                self.spec,
                self.blocks[layer],
                choice.selection.layers[layer],
                choice.selection.sizes,
                choice.refits.get(layer),
            )
            if self.reuse:
                self.built[(row, layer)] = module
        return module

    def _splice(
        self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if self.skipping[layer]:
            self.skipping[layer] = False
            return None
        rest = dict(kwargs)
        hidden = args[0] if args else rest.pop("hidden_states")
        out = output[0] if isinstance(output, tuple) else output
        if hidden.dim() != 3 or out.shape != hidden.shape:
            raise UnsupportedArchitectureError(
                f"layer {layer}'s FF maps {tuple(hidden.shape)} to {tuple(out.shape)}; the "
                "griffin protocol on experts needs [batch, positions, hidden] in and out"
            )
        if hidden.shape[0] != len(self.choices):
            raise UnsupportedArchitectureError(
                f"a batch of {hidden.shape[0]} rows reached layer {layer} with "
                f"{len(self.choices)} prompt choices"
            )
        if self.start >= hidden.shape[1]:
            return None
        out = out.clone()
        for row in range(hidden.shape[0]):
            pruned = self._pruned(row, layer)
            # every position of the row goes through the pruned layer, as through the full
            # one: the experts then see the same token groups, so a pruned layer that keeps
            # everything computes the full layer's output bit for bit (--check)
            part = pruned(hidden[row : row + 1], *args[1:], **rest)
            part = part[0] if isinstance(part, tuple) else part
            out[row, self.start :] = part[0, self.start :]
        return (out, *output[1:]) if isinstance(output, tuple) else out
