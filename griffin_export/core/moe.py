"""Mixture-of-experts layers: find them, compute one routed expert, slice experts and router.

The routed experts of every supported family are transformers' fused experts modules
(``@use_experts_implementation``): ``gate_up_proj`` (or ``up_proj`` without a gate) and
``down_proj``, one slab per expert, whose layout the module states itself:

* ``is_transposed``: slabs are ``[in, out]`` (gpt-oss) instead of ``[out, in]``;
* ``is_concatenated``: the gate/up output is ``[gate; up]`` (neuron ``j`` at ``j`` and
  ``I + j``), else interleaved (gpt-oss: ``2j`` and ``2j + 1``);
* ``has_bias``: ``gate_up_proj_bias`` ``[E, 2I]`` and ``down_proj_bias`` ``[E, H]``;
* ``_apply_gate`` turns the gate/up output into the ``I`` activations the down projection
  reads (``act(gate) * up``, or gpt-oss's clamped variant).

So one expert's computation, and its slicing, are written once here from those flags; the
per-family facts (where the router and experts sit, the config keys) are the
:class:`~griffin_export.core.architectures.MoeSpec` rows. Pure tensor and module code, no files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, MoeSpec, _get
from griffin_export.core.slicing import prune_block
from griffin_export.errors import UnsupportedArchitectureError, UsageError

#: module attributes that hold the number of routed experts (router, experts, MoE block)
COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
#: experts-module attributes that hold the routed experts' width
WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")


def moe_spec(spec: ArchSpec) -> MoeSpec:
    """``spec.moe``, or an error for a dense family."""
    if spec.moe is None:
        raise UsageError("this model has no mixture-of-experts layers; use the dense path")
    return spec.moe


def dense_spec(spec: ArchSpec) -> ArchSpec:
    """The family's dense FF layers (the blocks of an MoE model without routed experts)."""
    return replace(spec, moe=None)


def shared_spec(spec: ArchSpec) -> ArchSpec | None:
    """The shared expert as a dense FF (``mlp`` pointing at it), ``None`` without one."""
    moe = moe_spec(spec)
    if moe.shared is None:
        return None
    return replace(spec, mlp=f"{moe.block}.{moe.shared}", moe=None)


def moe_module(spec: ArchSpec, block: nn.Module) -> nn.Module | None:
    """The sparse MoE module of ``block``, ``None`` for a dense layer of an MoE model."""
    moe = moe_spec(spec)
    try:
        module = _get(block, moe.block)
        _get(module, moe.experts)
    except AttributeError:
        return None
    return module


def experts_of(spec: ArchSpec, block: nn.Module) -> nn.Module:
    module = moe_module(spec, block)
    if module is None:
        raise UsageError("this decoder block is a dense layer; it has no routed experts")
    return _get(module, moe_spec(spec).experts)


def router_of(spec: ArchSpec, block: nn.Module) -> nn.Module:
    module = moe_module(spec, block)
    if module is None:
        raise UsageError("this decoder block is a dense layer; it has no router")
    return _get(module, moe_spec(spec).router)


def is_moe_layer(spec: ArchSpec, block: nn.Module) -> bool:
    return moe_module(spec, block) is not None


def shared_present(spec: ArchSpec, block: nn.Module) -> bool:
    """Whether ``block``'s MoE module has its shared expert (ERNIE builds it only when
    ``moe_num_shared_experts`` is set)."""
    shared = shared_spec(spec)
    if shared is None or not is_moe_layer(spec, block):
        return False
    try:
        return isinstance(_get(block, shared.mlp), nn.Module)
    except AttributeError:
        return False


def has_down_bias(spec: ArchSpec, model: nn.Module) -> bool:
    """Whether the routed experts' down projections have a bias (gpt-oss)."""
    for block in spec.blocks(model):
        if is_moe_layer(spec, block):
            return ExpertsLayout.of(experts_of(spec, block)).has_bias
    return False


def identity_tensors(spec: ArchSpec, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint key, tensor)`` of what identifies an MoE model cheaply: every MoE
    layer's router weight, the shared experts' and dense layers' FF tensors. The keys are the
    loaded model's names, which are not always the checkpoint's (Mixtral stores its router
    under ``block_sparse_moe``, Granite under ``router.layer``): readers of the checkpoint map
    them with transformers' conversion mapping (the streaming export samples the loaded
    block)."""
    for layer, block in enumerate(spec.blocks(model)):
        yield from layer_identity_tensors(spec, layer, block)


def layer_identity_tensors(
    spec: ArchSpec, layer: int, block: nn.Module
) -> Iterator[tuple[str, Tensor]]:
    """:func:`identity_tensors` of decoder block ``layer`` alone."""
    moe = moe_spec(spec)
    if not is_moe_layer(spec, block):
        yield from ff_block_tensors(dense_spec(spec), layer, block)
        return
    name = moe.router_tensors[0][0]
    key = ".".join(p for p in (spec.layers, str(layer), moe.block, moe.router, name) if p)
    yield key, router_weight(spec, block)
    shared = shared_spec(spec)
    if shared is not None and shared_present(spec, block):
        yield from ff_block_tensors(shared, layer, block)


def ff_block_tensors(spec: ArchSpec, layer: int, block: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint key, tensor)`` of one dense FF block's weights and biases."""
    for role, module in spec.projections(block).items():
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None)
            if isinstance(tensor, Tensor):
                yield spec.param_name(layer, role, kind), tensor


# -- one expert's layout ------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertsLayout:
    """The layout flags of a fused experts module (see the module docstring)."""

    has_gate: bool
    transposed: bool
    concatenated: bool
    has_bias: bool

    @classmethod
    def of(cls, experts: nn.Module) -> ExpertsLayout:
        if not isinstance(getattr(experts, "down_proj", None), Tensor):
            raise UnsupportedArchitectureError(
                f"{type(experts).__name__} has no fused down_proj tensor; griffin reads "
                "transformers' fused experts (gate_up_proj/down_proj [experts, ...])"
            )
        return cls(
            has_gate=bool(getattr(experts, "has_gate", True)),
            transposed=bool(getattr(experts, "is_transposed", False)),
            concatenated=bool(getattr(experts, "is_concatenated", True)),
            has_bias=bool(getattr(experts, "has_bias", False)),
        )

    @property
    def input_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    def input_rows(self, keep: Tensor, width: int) -> Tensor:
        """Output positions of the gate/up projection that belong to neurons ``keep``."""
        if not self.has_gate:
            return keep
        if self.concatenated:
            return torch.cat([keep, keep + width])
        return torch.stack([2 * keep, 2 * keep + 1], dim=1).reshape(-1)

    @property
    def input_axis(self) -> int:
        """Axis of one expert's gate/up slab that indexes its outputs."""
        return 1 if self.transposed else 0

    @property
    def down_axis(self) -> int:
        """Axis of one expert's down slab that indexes its inputs (the neurons)."""
        return 0 if self.transposed else 1


def expert_count(experts: nn.Module) -> int:
    return int(expert_param(experts, "down_proj").shape[0])


def expert_width(experts: nn.Module) -> int:
    layout = ExpertsLayout.of(experts)
    return int(expert_param(experts, "down_proj").shape[1 + layout.down_axis])


def expert_param(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor)
    return value


def _linear(x: Tensor, weight: Tensor, transposed: bool, bias: Tensor | None) -> Tensor:
    out = x @ weight if transposed else x @ weight.T
    return out if bias is None else out + bias


def expert_hidden(experts: nn.Module, expert: int, x: Tensor) -> Tensor:
    """The ``[T, I]`` activations expert ``expert`` feeds its down projection for tokens
    ``x`` (``[T, H]``): exactly what the experts module computes for them."""
    layout = ExpertsLayout.of(experts)
    weight = expert_param(experts, layout.input_name)[expert]
    bias = expert_param(experts, f"{layout.input_name}_bias")[expert] if layout.has_bias else None
    out = _linear(x.to(weight.dtype), weight, layout.transposed, bias)
    if layout.has_gate:
        return experts._apply_gate(out)  # type: ignore[operator]
    return experts.act_fn(out)  # type: ignore[operator]


def expert_output(experts: nn.Module, expert: int, z: Tensor) -> Tensor:
    """Expert ``expert``'s output ``[T, H]`` from its activations ``z`` (``[T, I]``), before
    the routing weight."""
    layout = ExpertsLayout.of(experts)
    weight = expert_param(experts, "down_proj")[expert]
    bias = expert_param(experts, "down_proj_bias")[expert] if layout.has_bias else None
    return _linear(z, weight, layout.transposed, bias)


def expert_down(experts: nn.Module, expert: int) -> Tensor:
    """Expert ``expert``'s down weight as one matrix (``[H, I]``, or ``[I, H]`` transposed)."""
    return expert_param(experts, "down_proj")[expert]


# -- slicing ------------------------------------------------------------------------------------
@torch.no_grad()
def slice_expert_tensors(
    experts: nn.Module, keep_experts: Tensor, keep_neurons: Tensor
) -> dict[str, Tensor]:
    """The experts module's tensors for experts ``keep_experts`` (``[E']``), each keeping
    its own neurons ``keep_neurons[i]`` (``[E', I']``): ``{name: tensor}``, new tensors."""
    pieces = [
        slice_expert(experts, expert, neurons)
        for expert, neurons in zip(keep_experts.tolist(), keep_neurons, strict=True)
    ]
    return {key: torch.stack([piece[key] for piece in pieces]) for key in pieces[0]}


@torch.no_grad()
def slice_expert(experts: nn.Module, expert: int, neurons: Tensor) -> dict[str, Tensor]:
    """One expert's slabs at its neurons ``neurons``: ``{name: tensor}`` (the experts
    module's tensor names, without the expert axis), new tensors."""
    layout = ExpertsLayout.of(experts)
    name = layout.input_name
    rows = layout.input_rows(neurons, expert_width(experts))
    slab = expert_param(experts, name)[expert]
    down = expert_param(experts, "down_proj")[expert]
    out = {
        name: slab.index_select(layout.input_axis, rows.to(slab.device)),
        "down_proj": down.index_select(layout.down_axis, neurons.to(down.device)),
    }
    if layout.has_bias:
        bias = expert_param(experts, f"{name}_bias")[expert]
        out[f"{name}_bias"] = bias.index_select(0, rows.to(bias.device))
        out["down_proj_bias"] = expert_param(experts, "down_proj_bias")[expert]
    return out


def router_tensor(router: nn.Module, name: str) -> Tensor:
    module_path, _, attr = name.rpartition(".")
    owner = _get(router, module_path)
    value = getattr(owner, attr, None)
    if not isinstance(value, Tensor):
        raise UnsupportedArchitectureError(
            f"the router ({type(router).__name__}) has no tensor '{name}'; the architecture "
            "table's router_tensors do not match this model"
        )
    return value


def router_weight(spec: ArchSpec, block: nn.Module) -> Tensor:
    """The router's ``[experts, hidden]`` weight matrix in ``block`` (the first of the
    row's ``router_tensors``)."""
    return router_tensor(router_of(spec, block), moe_spec(spec).router_tensors[0][0])


def _set_tensor(owner: nn.Module, attr: str, value: Tensor) -> None:
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        owner.register_buffer(attr, value, persistent=attr not in owner._non_persistent_buffers_set)


def _sync_counts(modules: list[nn.Module], names: tuple[str, ...], old: int, new: int) -> None:
    for module in modules:
        for name in names:
            if getattr(module, name, None) == old:
                setattr(module, name, new)


@torch.no_grad()
def prune_moe_block(
    spec: ArchSpec,
    block: nn.Module,
    keep_experts: Tensor,
    keep_neurons: Tensor,
    keep_shared: Tensor | None = None,
) -> None:
    """Slice one MoE decoder block in place to experts ``keep_experts`` (ascending, ``[E']``),
    each with its neurons ``keep_neurons`` (``[E', I']``), the router's per-expert tensors to
    the same experts, and the shared expert (if any) to ``keep_shared``. The full tensors are
    released; module attributes that state the expert count and width follow."""
    moe = moe_spec(spec)
    module = moe_module(spec, block)
    if module is None:
        raise UsageError("prune_moe_block on a dense layer; use slicing.prune_block")
    experts = _get(module, moe.experts)
    router = _get(module, moe.router)
    n_experts, width = expert_count(experts), expert_width(experts)
    for name, value in slice_expert_tensors(experts, keep_experts, keep_neurons).items():
        _set_tensor(experts, name, value)
    owned = [(router, name, axis) for name, axis in moe.router_tensors]
    owned += [(module, name, axis) for name, axis in moe.block_tensors]
    for owner, name, axis in owned:
        tensor = router_tensor(owner, name)
        path, _, attr = name.rpartition(".")
        sliced = tensor.data.index_select(axis, keep_experts.to(tensor.device))
        _set_tensor(_get(owner, path), attr, sliced)
    _sync_counts([module, router, experts], COUNT_ATTRIBUTES, n_experts, len(keep_experts))
    _sync_counts([experts], WIDTH_ATTRIBUTES, width, int(keep_neurons.shape[1]))
    shared = shared_spec(spec)
    if keep_shared is not None and shared is not None:
        prune_block(shared, block, keep_shared, shared_width_of(spec, block))


def shared_width_of(spec: ArchSpec, block: nn.Module) -> int:
    """The shared expert's width in ``block`` (its down projection's inputs)."""
    shared = shared_spec(spec)
    if shared is None:
        raise UsageError("this family has no shared expert")
    weight = shared.down_module(block).weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[shared.neuron_axis("down")])


def set_moe_config(
    spec: ArchSpec,
    config: Any,
    experts: int,
    width: int,
    dense_width: int | None,
    shared_width: int | None,
) -> None:
    """Write the kept sizes into ``config`` under the family's own keys: routed experts,
    their width, the dense layers' width (if the model has dense layers) and the shared
    expert's (its own field, or kept ``count * width`` where the family derives it)."""
    moe = moe_spec(spec)
    setattr(config, moe.count_key, int(experts))
    setattr(config, moe.width_key, int(width))
    if dense_width is not None and spec.size_key != moe.width_key:
        setattr(config, spec.size_key, int(dense_width))
    if shared_width is not None and moe.shared_width_key is not None:
        setattr(config, moe.shared_width_key, int(shared_width))


def routing_groups(spec: ArchSpec, config: Any) -> int:
    """The number of routing groups (group-limited routing, e.g. DeepSeek-V3's ``n_group``;
    1 without)."""
    key = moe_spec(spec).group_key
    return int(getattr(config, key, None) or 1) if key else 1


def check_expert_count(spec: ArchSpec, config: Any, keep: int) -> None:
    """Refuse ``keep`` routed experts per layer where the family's routing cannot run with
    that many: fewer than each token's ``top_k``, or (group-limited routing) a count the
    groups cannot split evenly. One line naming the ``--experts`` values that work."""
    moe = moe_spec(spec)
    total = config_int(config, moe.count_key, 0)
    top_k = config_int(config, moe.top_k_key, 1) or 1
    groups = int(getattr(config, moe.group_key or "", None) or 1)
    topk_group = int(getattr(config, moe.topk_group_key or "", None) or groups)
    problems = valid_expert_counts(total, top_k, groups, topk_group)
    if keep in problems:
        return
    works = ", ".join(f"{n / total:g}" for n in problems) or "none"
    why = f"each token is routed to {top_k}"
    if groups > 1:
        why += f" and the {groups} routing groups must keep equal shares (>= 2 each)"
    raise UsageError(
        f"keeping {keep} of {total} routed experts per layer cannot route ({why}); "
        f"--experts values that work: {works}"
    )


def config_int(config: Any, key: str, default: int) -> int:
    """``config.<key>`` as one integer; a per-layer list of one repeated value counts as that
    value (HunYuan's ``moe_topk``). ``default`` when the field is absent or ``None``."""
    value = getattr(config, key, None)
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]
    if value is None:
        return default
    if not isinstance(value, int):
        raise UnsupportedArchitectureError(
            f"config.{key} is {value!r}; griffin needs one integer for every MoE layer"
        )
    return value


def valid_expert_counts(total: int, top_k: int, groups: int, topk_group: int) -> list[int]:
    """Every kept expert count a layer of ``total`` experts can route with."""
    counts = []
    for keep in range(1, total + 1):
        if keep < top_k:
            continue
        if groups > 1:
            per_group = keep // groups
            if keep % groups or per_group < 2 or topk_group * per_group < top_k:
                continue
        counts.append(keep)
    return counts
