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
        assert isinstance(weight, Tensor)
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
    if len(keep) != len(blocks):
        raise ValueError(f"{len(keep)} index sets for {len(blocks)} layers")
    sizes = {int(k.numel()) for k in keep}
    if len(sizes) != 1:
        raise ValueError(f"non-uniform budgets {sorted(sizes)} cannot be stored in one config")
    d_ff = spec.d_ff(model.config)
    for block, idx in zip(blocks, keep, strict=True):
        prune_block(spec, block, idx, d_ff)
    spec.set_d_ff(model.config, sizes.pop())


def _sync_shape_attributes(module: nn.Module) -> None:
    weight = module.weight
    assert isinstance(weight, Tensor)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif hasattr(module, "nf"):  # transformers' Conv1D: weight [nx, nf]
        module.nx, module.nf = weight.shape  # type: ignore[assignment]
