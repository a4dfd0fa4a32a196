"""Build smaller FF weights from kept neuron indices. Pure tensor code, no files.

Input projections (gate/up, fused gate_up) keep the kept neurons' rows and bias entries;
the down projection keeps the kept neurons' columns and its bias unchanged. GPT-2's
``Conv1D`` stores ``[in, out]``, so the axes swap (``ArchSpec.neuron_axis``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import INPUT_ROLES, ArchSpec
from griffin_export.errors import UnsupportedArchitectureError, UsageError


def fused_indices(keep: Tensor, d_ff: int) -> Tensor:
    """Rows of a fused ``[gate; up]`` projection that belong to neurons ``keep``."""
    return torch.cat([keep, keep + d_ff])


def slice_weight(spec: ArchSpec, role: str, weight: Tensor, keep: Tensor, d_ff: int) -> Tensor:
    """The part of one projection's weight that serves neurons ``keep``.

    Args:
        role: ``gate``, ``up``, ``gate_up`` or ``down``.
        weight: the full weight as stored by the module.
        keep: ``[k]`` int64 neuron indices (any order: the output follows it).
        d_ff: full FF width (needed for the fused layout).
    """
    index = fused_indices(keep, d_ff) if role == "gate_up" else keep
    return weight.index_select(spec.neuron_axis(role), index.to(weight.device))


def slice_bias(role: str, bias: Tensor, keep: Tensor, d_ff: int) -> Tensor:
    """Bias of a projection after slicing: input projections keep the neurons' entries."""
    if role not in INPUT_ROLES:
        return bias
    index = fused_indices(keep, d_ff) if role == "gate_up" else keep
    return bias.index_select(0, index.to(bias.device))


def prune_block(spec: ArchSpec, block: nn.Module, keep: Tensor, d_ff: int) -> None:
    """Replace one block's FF parameters by their slices at ``keep``, in place.

    The old full-width tensors are released (no copy of the full model is kept). Module
    bookkeeping attributes (``in_features``/``out_features``, ``Conv1D.nf``) follow.
    """
    for role, module in spec.projections(block).items():
        weight = module.weight
        if not isinstance(weight, Tensor):
            raise UnsupportedArchitectureError(
                f"the {role} projection ({type(module).__name__}) has no weight tensor; griffin "
                "slices nn.Linear and Conv1D projections only"
            )
        module.weight = nn.Parameter(
            slice_weight(spec, role, weight.data, keep, d_ff), requires_grad=weight.requires_grad
        )
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            module.bias = nn.Parameter(
                slice_bias(role, bias.data, keep, d_ff), requires_grad=bias.requires_grad
            )
        _sync_shape_attributes(module)


def prune_model(spec: ArchSpec, model: nn.Module, keep: Sequence[Tensor]) -> None:
    """Slice every block of ``model`` to the kept indices and set the config's FF width.

    All layers must keep the same number of neurons (uniform budget), since stock
    ``transformers`` configs hold a single ``intermediate_size``.
    """
    blocks = spec.blocks(model)
    d_ff = spec.d_ff(model.config)
    check_keep(keep, len(blocks), d_ff)
    sizes = {int(k.numel()) for k in keep}
    if len(sizes) != 1:
        raise UsageError(
            f"prune_model keeps one FF width in every layer, got {sorted(sizes)}; keep the same "
            "number per layer, or use griffin_export.formats.layout.prune_model_per_layer"
        )
    for block, idx in zip(blocks, keep, strict=True):
        prune_block(spec, block, idx, d_ff)
    spec.set_d_ff(model.config, sizes.pop())


def check_keep(keep: Sequence[Tensor], n_layers: int, d_ff: int) -> None:
    """Refuse kept-index sets that cannot slice a model of ``n_layers`` FF layers of width
    ``d_ff``: one :class:`UsageError` line naming the layer, the value and the fix.

    Each set must be a non-empty 1-D integer tensor of distinct indices in ``0..d_ff-1`` (a
    repeated neuron would be counted twice by the down projection)."""
    if len(keep) != n_layers:
        raise UsageError(
            f"{len(keep)} kept-index sets for a model of {n_layers} layers; pass one per layer"
        )
    for layer, index in enumerate(keep):
        problem = None
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            what = (
                f"a {index.dtype} tensor of shape {tuple(index.shape)}"
                if isinstance(index, Tensor)
                else f"a {type(index).__name__}"
            )
            problem = f"is {what}, not a 1-D integer tensor"
        elif index.numel() == 0:
            problem = "is empty (every layer keeps at least one neuron)"
        elif int(index.min()) < 0 or int(index.max()) >= d_ff:
            problem = f"has indices outside 0..{d_ff - 1} (min {int(index.min())}, max "
            problem += f"{int(index.max())})"
        elif index.unique().numel() != index.numel():
            problem = "repeats a neuron"
        if problem is not None:
            raise UsageError(
                f"kept indices of layer {layer} {problem}; pass distinct neuron indices below "
                f"d_ff {d_ff} (e.g. from top_k_indices)"
            )


def _sync_shape_attributes(module: nn.Module) -> None:
    weight = module.weight
    assert isinstance(weight, Tensor)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif hasattr(module, "nf"):  # transformers' Conv1D: weight [nx, nf]
        module.nx, module.nf = weight.shape  # type: ignore[assignment]
