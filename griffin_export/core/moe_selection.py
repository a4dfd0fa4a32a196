"""Choose the experts, and the neurons inside them, of every layer of a mixture-of-experts
model from prompts.

Per MoE layer, from the tokens the full model routes:

* each routed expert's **importance** is REAP's router-weighted activation: the routing
  weight times the norm of the expert's output, summed over the prompt tokens routed to it;
  the ``E'`` most important experts are kept (with group-limited routing, the same number in
  every group). Experts the prompt never routed to only fill places when ``E'`` exceeds the
  routed ones, in order of the router's probability mass over the prompt (recorded as
  ``filled``);
* inside every kept expert, the GRIFFIN statistic over the tokens routed to it chooses its
  ``I'`` neurons (one width for all experts: one config field). A filled expert saw no token;
  its neurons are ranked by weight norms (gate/up row norm times down column norm).

Shared experts and the dense layers of an MoE model use the dense GRIFFIN statistic over all
tokens, as in :mod:`griffin_export.core.selection`. Prompts run layer-major
(:func:`~griffin_export.core.activations.run_layer_major`), so one layer's statistics are
held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.activations import run_layer_major
from griffin_export.core.architectures import ArchSpec, _get
from griffin_export.core.compensation import Compensation, GramStats, Refit, apply_stored
from griffin_export.core.moe import (
    ExpertsLayout,
    check_expert_count,
    dense_spec,
    expert_count,
    expert_down,
    expert_hidden,
    expert_output,
    expert_param,
    expert_width,
    experts_of,
    is_moe_layer,
    moe_spec,
    prune_moe_block,
    router_weight,
    set_moe_config,
    shared_present,
    shared_spec,
    shared_width_of,
)
from griffin_export.core.scoring import keep_count, normalized_square_sum, top_k_indices
from griffin_export.core.selection import choose_experts
from griffin_export.core.slicing import prune_block
from griffin_export.errors import UnsupportedArchitectureError, UsageError

#: how kept experts are ranked: REAP's router-weighted output norm, or routed-token counts
EXPERT_SCORES = ("reap", "count")
DEFAULT_EXPERT_SCORE = "reap"
#: an expert refits its down projection only on at least this many routed prompt tokens
MIN_REFIT_TOKENS = 16


@dataclass
class RoutedInputs:
    """What a fused experts module receives in one forward: tokens ``hidden`` ``[T, H]``,
    each routed to experts ``index`` ``[T, k]`` with weights ``weights`` ``[T, k]``."""

    hidden: Tensor
    index: Tensor
    weights: Tensor


@dataclass
class MoeLayerChoice:
    """One MoE layer's choice.

    Attributes:
        experts: ``[E']`` kept routed experts, ascending.
        neurons: ``[E', I']`` each kept expert's neurons, ascending per row.
        shared: the shared expert's kept neurons, ``None`` without one.
        importance: ``[E]`` the score experts were ranked by.
        mass: ``[E]`` routing weight summed over the prompt tokens routed to each expert.
        tokens: ``[E]`` prompt tokens routed to each expert.
        filled: kept experts no prompt token was routed to.
        refit: experts whose down projection was refitted.
    """

    experts: Tensor
    neurons: Tensor
    shared: Tensor | None
    importance: Tensor
    mass: Tensor
    tokens: Tensor
    filled: list[int] = field(default_factory=list)
    refit: list[int] = field(default_factory=list)


#: per layer: a dense layer's kept neurons, or an MoE layer's choice
LayerChoice = Tensor | MoeLayerChoice


@dataclass
class MoeSizes:
    """The kept sizes of an MoE export (one per kind of FF: one config field each)."""

    experts: int
    experts_total: int
    width: int
    width_total: int
    dense: int | None = None
    dense_total: int | None = None
    shared: int | None = None
    shared_total: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return dict(self.__dict__)


@dataclass
class MoeSelection:
    """Every layer's choice in an MoE model (the counterpart of
    :class:`~griffin_export.core.selection.Selection`)."""

    layers: list[LayerChoice]
    sizes: MoeSizes
    tokens: int
    expert_score: str = DEFAULT_EXPERT_SCORE

    @property
    def d_ff(self) -> int:
        """The routed experts' full width."""
        return self.sizes.width_total

    @property
    def k_per_layer(self) -> list[int]:
        """Per layer the kept width of its routed experts, or of a dense layer's FF."""
        return [
            int(c.numel()) if isinstance(c, Tensor) else int(c.neurons.shape[1])
            for c in self.layers
        ]

    def index_map(self) -> dict[str, Tensor]:
        """The kept-index map: ``layer.<i>`` (a dense layer's neurons), or for an MoE layer
        ``layer.<i>.experts`` ``[E']``, ``layer.<i>.neurons`` ``[E', I']`` (row ``r``: the
        neurons of expert ``experts[r]``) and ``layer.<i>.shared``; all int32."""
        out: dict[str, Tensor] = {}
        for i, choice in enumerate(self.layers):
            if isinstance(choice, Tensor):
                out[f"layer.{i}"] = choice.to(torch.int32).cpu()
                continue
            out[f"layer.{i}.experts"] = choice.experts.to(torch.int32).cpu()
            out[f"layer.{i}.neurons"] = choice.neurons.to(torch.int32).cpu()
            if choice.shared is not None:
                out[f"layer.{i}.shared"] = choice.shared.to(torch.int32).cpu()
        return out

    def record(self) -> dict[str, Any]:
        """The manifest's ``moe`` record: sizes, the expert score, and per MoE layer the kept
        experts, the share of the prompt's routing weight they carried, the experts filled
        in without routed tokens and the number refitted."""
        layers = []
        for i, choice in enumerate(self.layers):
            if isinstance(choice, Tensor):
                continue
            total = float(choice.mass.sum())
            kept = float(choice.mass[choice.experts].sum())
            layers.append(
                {
                    "layer": i,
                    "experts": choice.experts.tolist(),
                    "mass_kept": round(kept / total, 6) if total > 0 else 0.0,
                    "filled": list(choice.filled),
                    "refit": len(choice.refit),
                }
            )
        return {"sizes": self.sizes.to_dict(), "expert_score": self.expert_score, "layers": layers}


@contextmanager
def capture_moe_inputs(
    spec: ArchSpec, model: nn.Module, sink: Callable[[int, Any], None]
) -> Iterator[None]:
    """During forwards, call ``sink(layer, x)`` with what every FF of ``model`` computes
    from: an MoE layer's routed experts get :class:`RoutedInputs`, then its shared expert
    ``("shared", z)``; a dense layer ``("dense", z)`` (``z`` the down projection's input)."""
    handles = []
    shared = shared_spec(spec)
    dense = dense_spec(spec)
    for layer, block in enumerate(spec.blocks(model)):
        if is_moe_layer(spec, block):

            def routed(
                _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer
            ) -> None:
                sink(layer, _routed_inputs(args, kwargs))

            experts = experts_of(spec, block)
            handles.append(experts.register_forward_pre_hook(routed, with_kwargs=True))
            if shared is not None and shared_present(spec, block):
                down = shared.down_module(block)
                handles.append(down.register_forward_pre_hook(_z_hook(sink, layer, "shared")))
        else:
            down = dense.down_module(block)
            handles.append(down.register_forward_pre_hook(_z_hook(sink, layer, "dense")))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _routed_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> RoutedInputs:
    """The experts module's call ``(hidden, top_k_index, top_k_weights)`` as passed."""
    values = [*args, *kwargs.values()]
    return RoutedInputs(values[0], values[1], values[2])


class _Routed(Exception):
    """Raised by :func:`route_tokens`' hook to stop the MoE block before its experts run."""

    def __init__(self, inputs: RoutedInputs) -> None:
        super().__init__()
        self.inputs = inputs


def route_tokens(spec: ArchSpec, moe_block: nn.Module, x: Tensor) -> RoutedInputs:
    """How ``moe_block`` (an MoE module, e.g. the full original's) routes tokens ``x``
    (``[T, H]``): its own routing code runs (softmax or sigmoid, selection bias, groups,
    renormalisation: whatever the family does) up to the call of its experts, which is
    intercepted and never computed. Returns the experts' inputs: ``index`` ``[T, k]``,
    ``weights`` ``[T, k]`` (an index outside ``0..E-1`` is a masked slot)."""
    experts = _get(moe_block, moe_spec(spec).experts)

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Routed(_routed_inputs(args, kwargs))

    handle = experts.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        moe_block(x.reshape(1, -1, x.shape[-1]))
    except _Routed as routed:
        inputs = routed.inputs
    else:
        raise UnsupportedArchitectureError(
            f"{type(moe_block).__name__} never called its experts module; griffin cannot read "
            "its routing"
        )
    finally:
        handle.remove()
    n = x.reshape(-1, x.shape[-1]).shape[0]
    return RoutedInputs(
        inputs.hidden.reshape(n, -1), inputs.index.reshape(n, -1), inputs.weights.reshape(n, -1)
    )


def _z_hook(sink: Callable[[int, Any], None], layer: int, kind: str) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        sink(layer, (kind, args[0]))

    return hook


class _LayerStats:
    """One MoE layer's sums over the prompts' routed tokens."""

    def __init__(self, experts: nn.Module, router_weight: Tensor, refit: bool) -> None:
        n, width = expert_count(experts), expert_width(experts)
        self.importance = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.long)
        self.mass = torch.zeros(n, dtype=torch.float64)
        self.prob = torch.zeros(n, dtype=torch.float64)
        self.sums = torch.zeros(n, width, dtype=torch.float32)
        self.grams: dict[int, GramStats] | None = {} if refit else None
        self.router_weight = router_weight
        self.width = width

    def add(self, experts: nn.Module, inputs: RoutedInputs) -> None:
        x = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])
        index = inputs.index.reshape(x.shape[0], -1)
        weights = inputs.weights.reshape(x.shape[0], -1)
        logits = x.float() @ self.router_weight.float().T
        self.prob += torch.softmax(logits, dim=-1).sum(0, dtype=torch.float64).cpu()
        for expert in torch.unique(index).tolist():
            if not 0 <= expert < len(self.counts):
                continue  # a masked slot (routing to "no expert")
            token, slot = torch.where(index == expert)
            z = expert_hidden(experts, expert, x[token])
            y = expert_output(experts, expert, z)
            w = weights[token, slot].float()
            self.importance[expert] += float((w * y.float().norm(dim=-1)).sum())
            self.mass[expert] += float(w.sum())
            self.counts[expert] += int(token.numel())
            self.sums[expert] += normalized_square_sum(z).cpu()
            if self.grams is not None:
                stats = self.grams.get(expert)
                if stats is None:
                    stats = self.grams[expert] = GramStats.zeros(self.width, z.device)
                stats.add(z)


def choose_routed(
    importance: Tensor, prob: Tensor, routed: Tensor, keep: int, groups: int = 1
) -> tuple[Tensor, list[int]]:
    """The ``keep`` experts to keep (ascending) and those of them filled in without routed
    tokens. Routed experts (``routed`` true) rank by ``importance``, above every unrouted
    one; unrouted ones rank by router probability ``prob``. With ``groups > 1`` the experts
    split into that many equal contiguous groups and each keeps ``keep / groups``."""
    top = float(importance.max()) if importance.numel() else 0.0
    ranked = 2.0 + importance.double() / (top if top > 0 else 1.0)  # in [2, 3]
    spare = prob.double() / (float(prob.max()) + 1.0) if prob.numel() else prob.double()
    key = torch.where(routed, ranked, spare)  # unrouted in [0, 1)
    size = importance.numel() // groups
    chosen = [
        top_k_indices(key[g * size : (g + 1) * size], keep // groups) + g * size
        for g in range(groups)
    ]
    kept = torch.sort(torch.cat(chosen)).values
    filled = [int(e) for e in kept.tolist() if not bool(routed[e])]
    return kept, filled


def weight_norm_scores(experts: nn.Module, expert: int) -> Tensor:
    """Neuron scores of an expert no token reached: gate/up row norms times down column norm."""
    layout = ExpertsLayout.of(experts)
    width = expert_width(experts)
    slab = getattr(experts, layout.input_name)[expert].float()
    rows = slab.norm(dim=1 - layout.input_axis)  # one norm per output position
    score = rows
    if layout.has_gate:
        pos = layout.input_rows(torch.arange(width), width)
        pairs = pos.reshape(2, width) if layout.concatenated else pos.reshape(width, 2).T
        score = rows[pairs[0]] * rows[pairs[1]]
    down = expert_down(experts, expert).float().norm(dim=1 - layout.down_axis)
    return score * down


class MoeLayerSelector:
    """Layer-major statistics of an MoE model: :meth:`add` takes one prompt's FF inputs of
    one layer; when a layer has seen every prompt its experts and neurons are chosen,
    ``on_layer(layer, choice, refits)`` is called, and its statistics are dropped.
    ``refits`` maps a kept expert (its original index) to its refitted down columns.
    ``load_experts(layer, kept)``, if given, is called once the kept experts are known and
    before their neurons are chosen (the streaming export reads the kept experts no prompt
    token was routed to there: their neurons rank by weight norms)."""

    def __init__(
        self,
        spec: ArchSpec,
        model: nn.Module,
        sizes: MoeSizes,
        prompts: int,
        on_layer: Callable[[int, LayerChoice, dict[int, Refit], Refit | None], None],
        compensation: Compensation | None = None,
        expert_score: str = DEFAULT_EXPERT_SCORE,
        load_experts: Callable[[int, list[int]], None] | None = None,
    ) -> None:
        self.spec, self.model, self.sizes = spec, model, sizes
        self.load_experts = load_experts
        self.blocks = spec.blocks(model)
        self.prompts = prompts
        self.on_layer = on_layer
        self.how = compensation if compensation is not None and compensation.active else None
        self.expert_score = expert_score
        self.dtype = next(model.parameters()).dtype
        self._stats: dict[int, _LayerStats] = {}
        self._dense: dict[int, Tensor] = {}
        self._grams: dict[int, GramStats] = {}
        self._seen: dict[int, int] = {}
        self.layers: list[LayerChoice | None] = [None] * len(self.blocks)
        moe = moe_spec(spec)
        config = model.config
        self.groups = int(getattr(config, moe.group_key, None) or 1) if moe.group_key else 1

    def add(self, layer: int, x: Any) -> None:
        if isinstance(x, RoutedInputs):
            experts = experts_of(self.spec, self.blocks[layer])
            stats = self._stats.get(layer)
            if stats is None:
                weight = router_weight(self.spec, self.blocks[layer])
                stats = _LayerStats(experts, weight.detach(), self.how is not None)
                self._stats[layer] = stats
            stats.add(experts, x)
            self._count(layer)
            return
        _kind, z = x
        part = normalized_square_sum(z)
        current = self._dense.get(layer)
        self._dense[layer] = part if current is None else current + part
        if self.how is not None:
            gram = self._grams.get(layer)
            if gram is None:
                gram = self._grams[layer] = GramStats.zeros(z.shape[-1], z.device)
            gram.add(z)
        self._count(layer)

    def _count(self, layer: int) -> None:
        """One FF input of ``layer`` seen; the layer is done after every prompt's (an MoE
        layer with a shared expert gets two per prompt, in either order)."""
        self._seen[layer] = self._seen.get(layer, 0) + 1
        block = self.blocks[layer]
        per_prompt = 2 if shared_present(self.spec, block) else 1
        if self._seen[layer] == self.prompts * per_prompt:
            self._finish(layer)

    def _dense_choice(
        self, layer: int, k: int, down: nn.Module, transposed: bool
    ) -> tuple[Tensor, Refit | None]:
        _scores, keep = choose_experts(self._dense.pop(layer), k, layer, self.dtype)
        gram = self._grams.pop(layer, None)
        refit = None
        if self.how is not None and gram is not None:
            reg = gram.regression(keep.to(gram.device), self.how.alpha, self.how.bias)
            weight = down.weight
            assert isinstance(weight, Tensor)
            refit = apply_stored(reg, weight.data, transposed)
        return keep, refit

    def _finish(self, layer: int) -> None:
        block = self.blocks[layer]
        sizes = self.sizes
        if not is_moe_layer(self.spec, block):
            dense = dense_spec(self.spec)
            assert sizes.dense is not None
            keep, refit = self._dense_choice(
                layer, sizes.dense, dense.down_module(block), dense.transposed
            )
            self.layers[layer] = keep
            self.on_layer(layer, keep, {}, refit)
            return
        stats = self._stats.pop(layer)
        experts = experts_of(self.spec, block)
        score = stats.importance if self.expert_score == "reap" else stats.counts.double()
        kept, filled = choose_routed(
            score, stats.prob, stats.counts > 0, sizes.experts, self.groups
        )
        if self.load_experts is not None:
            self.load_experts(layer, kept.tolist())
        neurons = []
        refits: dict[int, Refit] = {}
        layout = ExpertsLayout.of(experts)
        for expert in kept.tolist():
            if stats.counts[expert] > 0:
                _s, keep = choose_experts(stats.sums[expert], sizes.width, layer, self.dtype)
            else:
                keep = top_k_indices(weight_norm_scores(experts, expert), sizes.width)
            neurons.append(keep)
            gram = stats.grams.get(expert) if stats.grams is not None else None
            if self.how is not None and gram is not None and gram.tokens >= MIN_REFIT_TOKENS:
                reg = gram.regression(keep.to(gram.device), self.how.alpha, self.how.bias)
                down = expert_down(experts, expert).data
                refits[expert] = apply_stored(reg, down, layout.transposed)
        shared_keep, shared_refit = None, None
        shared = shared_spec(self.spec)
        if shared is not None and shared_present(self.spec, block):
            assert sizes.shared is not None
            shared_keep, shared_refit = self._dense_choice(
                layer, sizes.shared, shared.down_module(block), shared.transposed
            )
        choice = MoeLayerChoice(
            experts=kept,
            neurons=torch.stack(neurons),
            shared=shared_keep,
            importance=score.float(),
            mass=stats.mass.float(),
            tokens=stats.counts,
            filled=filled,
            refit=sorted(refits),
        )
        self.layers[layer] = choice
        del stats
        self.on_layer(layer, choice, refits, shared_refit)

    def selection(self, tokens: int) -> MoeSelection:
        """Every layer's choice, once the prompts (``tokens`` in all) have passed them all."""
        # made in inference mode (the hooks): plain tensors from here on
        layers = [_plain(choice) for choice in self.layers if choice is not None]
        if len(layers) != len(self.blocks):
            raise UsageError("not every layer saw the prompts; run_layer_major stopped early")
        return MoeSelection(
            layers=layers, sizes=self.sizes, tokens=tokens, expert_score=self.expert_score
        )


def plan_moe_sizes(
    spec: ArchSpec, model: nn.Module, ratio: float, experts_ratio: float, multiple_of: int = 1
) -> MoeSizes:
    """The kept sizes of every kind of FF in ``model``: ``experts_ratio`` of the routed
    experts (rounded, at least ``top_k``), ``ratio`` of the neurons of every expert, dense
    layer and shared expert (:func:`~griffin_export.core.scoring.keep_count`)."""
    moe = moe_spec(spec)
    config = model.config
    blocks = spec.blocks(model)
    moe_blocks = [b for b in blocks if is_moe_layer(spec, b)]
    if not moe_blocks:
        raise UsageError("this model has no mixture-of-experts layer to prune")
    experts = experts_of(spec, moe_blocks[0])
    total, width = expert_count(experts), expert_width(experts)
    keep = max(1, round(experts_ratio * total))
    check_expert_count(spec, config, keep)
    sizes = MoeSizes(
        experts=keep,
        experts_total=total,
        width=keep_count(width, ratio, multiple_of),
        width_total=width,
    )
    dense_blocks = [b for b in blocks if not is_moe_layer(spec, b)]
    if dense_blocks:
        d_ff = dense_spec(spec).d_ff(config)
        sizes.dense, sizes.dense_total = keep_count(d_ff, ratio, multiple_of), d_ff
    shared_blocks = [b for b in moe_blocks if shared_present(spec, b)]
    if shared_blocks:
        total_shared = shared_width_of(spec, shared_blocks[0])
        sizes.shared_total = total_shared
        if moe.shared_width_key is not None:
            sizes.shared = keep_count(total_shared, ratio, multiple_of)
        else:  # the family derives it: shared count x routed width
            count = int(getattr(config, moe.shared_count_key or "", 0) or 1)
            sizes.shared = count * sizes.width
    return sizes


def check_expert_score(expert_score: str) -> None:
    if expert_score not in EXPERT_SCORES:
        raise UsageError(
            f"expert score '{expert_score}' is not known; use one of {', '.join(EXPERT_SCORES)}"
        )


def select_moe(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    sizes: MoeSizes,
    *,
    compensation: Compensation | None = None,
    expert_score: str = DEFAULT_EXPERT_SCORE,
    on_layer: Callable[[int], None] | None = None,
    on_refit: Callable[[int, dict[int, Refit], Refit | None], None] | None = None,
) -> MoeSelection:
    """Run ``prompts`` through the full ``model`` layer-major and choose every layer's
    experts and neurons (module docstring). With an active ``compensation``, the kept
    experts with at least :data:`MIN_REFIT_TOKENS` routed tokens, the shared experts and the
    dense layers get their down projections refitted in place (kept columns overwritten, as
    :func:`~griffin_export.core.selection.select_experts` does), each after the layer's last
    prompt has passed it; slice the model afterwards. With ``on_refit``, the model is left
    as it was: ``on_refit(layer, refits, other)`` gets each layer's refits instead (per kept
    expert's original index, and the dense layer's or shared expert's), for
    :func:`write_moe_refit` to write elsewhere."""
    check_expert_score(expert_score)
    ids = [p for p in prompts if p.numel()]
    if not ids:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    blocks = spec.blocks(model)
    pending: dict[int, tuple[LayerChoice, dict[int, Refit], Refit | None]] = {}

    def chosen(
        layer: int, choice: LayerChoice, refits: dict[int, Refit], other: Refit | None
    ) -> None:
        if on_refit is not None and (refits or other is not None):
            on_refit(layer, refits, other)
        elif refits or other is not None:
            pending[layer] = (choice, refits, other)
        if on_layer is not None:
            on_layer(layer)

    selector = MoeLayerSelector(spec, model, sizes, len(ids), chosen, compensation, expert_score)
    first = next(model.parameters())
    stop_hooks = [
        block.register_forward_hook(lambda _m, _a, _o, layer=layer: _write(layer))
        for layer, block in enumerate(blocks)
    ]

    def _write(layer: int) -> None:
        if layer in pending:
            write_moe_refit(spec, blocks[layer], *pending.pop(layer))

    try:
        tokens = run_layer_major(
            spec, model, ids, selector.add, first.device, capture=capture_moe_inputs
        )
    finally:
        for handle in stop_hooks:
            handle.remove()
    for layer in list(pending):
        _write(layer)
    return selector.selection(tokens)


def _plain(choice: LayerChoice) -> LayerChoice:
    if isinstance(choice, Tensor):
        return choice.clone()
    for name in ("experts", "neurons", "shared", "importance", "mass", "tokens"):
        value = getattr(choice, name)
        if isinstance(value, Tensor):
            setattr(choice, name, value.clone())
    return choice


@torch.no_grad()
def write_moe_refit(
    spec: ArchSpec,
    block: nn.Module,
    choice: LayerChoice,
    refits: dict[int, Refit],
    other: Refit | None,
) -> None:
    """Write refitted down columns over the kept columns of the full-width weights: each
    refitted expert's slab, and the dense layer's or shared expert's down projection."""
    if isinstance(choice, Tensor):
        target, keep = dense_spec(spec), choice
    else:
        experts = experts_of(spec, block)
        layout = ExpertsLayout.of(experts)
        down = expert_param(experts, "down_proj")
        neurons = dict(zip(choice.experts.tolist(), choice.neurons, strict=True))
        for expert, refit in refits.items():
            columns = refit.weight.to(down.dtype)
            down.data[expert].index_copy_(layout.down_axis, neurons[expert], columns)
            if refit.bias is not None and layout.has_bias:
                bias = expert_param(experts, "down_proj_bias")
                bias.data[expert] += refit.bias.to(bias.dtype)
        shared = shared_spec(spec)
        if other is None or shared is None or choice.shared is None:
            return
        target, keep = shared, choice.shared
    if other is None:
        return
    down_module = target.down_module(block)
    weight = down_module.weight
    assert isinstance(weight, Tensor)
    columns = other.weight.to(weight.dtype)
    weight.data.index_copy_(target.neuron_axis("down"), keep.to(weight.device), columns)
    down_bias = getattr(down_module, "bias", None)
    if other.bias is not None and isinstance(down_bias, Tensor):
        down_bias.data += other.bias.to(down_bias.dtype)


def prune_moe_layer(spec: ArchSpec, block: nn.Module, choice: LayerChoice, sizes: MoeSizes) -> None:
    """Slice one decoder block of an MoE model in place to its ``choice``: a dense layer's
    neurons, or an MoE layer's routed experts, their neurons, router and shared expert."""
    if isinstance(choice, Tensor):
        assert sizes.dense_total is not None
        prune_block(dense_spec(spec), block, choice, sizes.dense_total)
    else:
        prune_moe_block(spec, block, choice.experts, choice.neurons, choice.shared)


def prune_moe_model(spec: ArchSpec, model: nn.Module, selection: MoeSelection) -> None:
    """Slice every layer of ``model`` to ``selection`` in place (routed experts, their
    neurons, routers, shared experts, dense layers) and write the kept sizes into its config
    under the family's keys (:func:`~griffin_export.core.moe.set_moe_config`)."""
    sizes = selection.sizes
    for block, choice in zip(spec.blocks(model), selection.layers, strict=True):
        prune_moe_layer(spec, block, choice, sizes)
    set_moe_config(spec, model.config, sizes.experts, sizes.width, sizes.dense, sizes.shared)
