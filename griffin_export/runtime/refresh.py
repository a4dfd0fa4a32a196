"""The refresh runtime: generate with an export, re-selecting its experts from the full
weights every N tokens (docs/design.md, "Refresh runtime").

The pruned model runs generation. The original's FF weights are memory-mapped from its
safetensors (zero-copy, read-only in effect), never built into a second model. A pre-hook on
every layer's first FF projection keeps the last W MLP inputs in a ring buffer. Every N
generated tokens (:class:`~griffin_export.core.schedule.RefreshSchedule`, the schedule
``griffin eval --mode gen`` and ``griffin ppl`` use too) each layer recomputes full-width
activations for those inputs from the original's gate/up weights, applies the export's
statistic and top-k, and copies only the neurons that changed into the slots of the ones that
left, in the live parameters' existing storage: no reallocation, the KV cache stays valid and
attention is never re-run.

On a compensated export (``griffin export --compensate refit``, the default) a refresh by
default also refits each layer's down projection on the ring window, as the export refitted it
on the prompt (``refit_on_refresh``; benchmarks/RESULTS-compensation.md measures both). With
the refit off, a layer whose experts changed gets the plain slice of the original's down
projection for its whole new set: the export's refitted columns of the neurons it kept were
fitted jointly with the neurons that left (they carry part of their output), so they are not
kept beside plain columns of the newcomers. A layer whose experts did not change keeps the
down projection it has (fitted, or sliced, for exactly that set).

On a mixture-of-experts export (``griffin export --experts R``) the dense layers and the
shared experts refresh as above; each MoE layer keeps a ring of its MoE block's inputs and, at
a refresh, routes them through the original's router with all experts, swaps in removed
experts that now carry more routed mass than kept ones, re-chooses every kept expert's
neurons from the window tokens routed to it, and copies changed experts (and a swapped
expert's router row) into their slots in place (:class:`MoeLayerState`). The original is then
loaded as a model (transformers fuses routed experts on loading) and only its FF modules are
kept.

Every :meth:`GriffinRuntime.generate` call starts from the export's experts: it first calls
:meth:`GriffinRuntime.reset`, which copies back (slot for slot, into the same storage) only
the rows a previous call's refreshes changed. So a call's tokens never depend on earlier calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import INPUT_ROLES, ArchSpec
from griffin_export.core.compensation import (
    DEFAULT_REFIT_ON_REFRESH,
    Compensation,
    GramStats,
    refit_stored,
)
from griffin_export.core.moe import (
    ExpertsLayout,
    dense_spec,
    expert_count,
    expert_down,
    expert_hidden,
    expert_param,
    expert_width,
    experts_of,
    is_moe_layer,
    moe_module,
    moe_spec,
    router_of,
    router_tensor,
    router_weight,
    routing_groups,
    shared_present,
    shared_spec,
    slice_expert,
)
from griffin_export.core.moe_selection import MIN_REFIT_TOKENS, route_tokens
from griffin_export.core.schedule import RefreshSchedule
from griffin_export.core.scoring import jaccard, normalized_square_sum, normalized_squares
from griffin_export.core.selection import choose_experts, non_finite_message
from griffin_export.errors import UsageError
from griffin_export.formats.exports import (
    OpenedExport,
    load_original,
    open_export,
    original_source,
)
from griffin_export.formats.manifest import EXPERTS_FILE
from griffin_export.formats.verify import check_original
from griffin_export.storage.loading import require_tokenizer
from griffin_export.storage.safetensors_io import SafetensorsReader, load_state


@dataclass
class RefreshEvent:
    """One refresh: after ``token_index`` generated tokens, per layer the Jaccard overlap of the
    kept set with the previous one and how many neurons were copied in.

    ``kept`` (per layer, the kept neurons in slot order, i.e. the order of the live weight rows)
    is recorded only when asked (``generate(record_kept=True)``): it is a full index list per
    layer per refresh, hundreds of MB over a long run of a large model.

    On an MoE layer ``overlap`` is the Jaccard overlap of its kept (routed expert, neuron)
    pairs and shared-expert neurons together, ``changed`` counts those new to the layer (a
    swapped-in expert brings all its ``I'``), and ``kept`` lists the shared expert's neurons
    (``[]`` without one).
    """

    token_index: int
    overlap: list[float]
    changed: list[int]
    seconds: float
    kept: list[list[int]] | None = None
    #: per layer, the routed experts swapped in (0 for a dense layer)
    swapped: list[int] = field(default_factory=list)
    #: with ``record_kept`` on an MoE export: per layer the original expert in each slot
    #: (``[]`` for a dense layer)
    experts: list[list[int]] | None = None

    @property
    def mean_overlap(self) -> float:
        return sum(self.overlap) / len(self.overlap)

    @property
    def total_changed(self) -> int:
        return sum(self.changed)

    @property
    def total_swapped(self) -> int:
        return sum(self.swapped)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    refreshes: list[RefreshEvent] = field(default_factory=list)
    seed: int | None = None  # the sampling seed used (drawn from OS entropy if none was given)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for event in data["refreshes"]:
            for name in ("kept", "experts"):
                if event[name] is None:
                    del event[name]
        data["tokens_per_second"] = self.tokens_per_second
        return data


class _Ring:
    """The last ``size`` MLP inputs of one layer, and what a function computes from each one
    (the runtime: its full-width activations, from which come its term of the statistic and,
    on a compensated export, the refit's regressors), computed once per row.

    Rows are computed lazily: :meth:`cached` computes the rows written since the previous call
    only, so a refresh every N tokens with a window of W > N pays for N rows, not W. The
    statistic is a sum over rows and the refit's Gram matrix too, so their order in the buffer
    does not matter.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: Tensor | None = None  # [size, hidden]
        self.features: Tensor | None = None  # [size, F], valid where computed
        self.count = 0  # valid rows
        self.next = 0  # slot the next row goes to
        self.unscored = 0  # rows written since the last score_sums (the newest ones)

    def write(self, x: Tensor) -> None:  # x: [T, hidden]
        x = x[-self.size :]
        n = x.shape[0]
        if self.rows is None:
            self.rows = torch.empty(self.size, x.shape[-1], dtype=x.dtype, device=x.device)
        first = min(n, self.size - self.next)
        self.rows[self.next : self.next + first] = x[:first]
        if first < n:
            self.rows[: n - first] = x[first:]
        self.next = (self.next + n) % self.size
        self.count = min(self.size, self.count + n)
        self.unscored = min(self.size, self.unscored + n)

    def contents(self) -> Tensor:
        if self.rows is None:
            raise RuntimeError("the ring buffer is empty")
        return self.rows[: self.count] if self.count < self.size else self.rows

    def cached(self, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(rows)`` ``[T, F]`` of the buffered rows (in buffer order), calling
        ``compute`` on the rows not computed before only (always pass the same function)."""
        if self.rows is None:
            raise RuntimeError("the ring buffer is empty")
        if self.unscored:
            slots = (torch.arange(self.unscored) + self.next - self.unscored) % self.size
            new = compute(self.rows.index_select(0, slots.to(self.rows.device)))  # [n, F]
            if self.features is None:  # on the device that computes (the original's)
                self.features = new.new_zeros(self.size, new.shape[-1])
            self.features.index_copy_(0, slots.to(new.device), new)
            self.unscored = 0
        assert self.features is not None  # rows exist, so some were computed
        return self.features[: self.count]

    def score_sums(self, squares: Callable[[Tensor], Tensor]) -> Tensor:
        """``sum`` over the buffered rows of ``squares(rows)`` ``[T, d_ff]`` (:meth:`cached`)."""
        return self.cached(squares).sum(dim=0)


def full_activations(
    spec: ArchSpec,
    act: Callable[[Tensor], Tensor],
    full: dict[str, Tensor],
    x: Tensor,
    *,
    block: int = 1024,
) -> Tensor:
    """Full-width down-projection inputs ``[T, d_ff]`` for MLP inputs ``x`` ``[T, hidden]``,
    from the original's input projections (``full`` maps ``role`` / ``role.bias`` to tensors).

    When the original's dtype differs from ``x``'s, its weights are cast ``block`` neurons at a
    time (the rows being read), never as a whole tensor per call.
    """
    first = spec.roles()[0]
    axis = spec.neuron_axis(first)
    d_ff = ff_width(spec, full)
    step = d_ff if full[first].dtype == x.dtype else block

    def project(role: str, lo: int, hi: int) -> Tensor:
        weight = full[role].narrow(axis, lo, hi - lo).to(x.dtype)
        y = x @ weight if spec.transposed else x @ weight.T
        bias = full.get(f"{role}.bias")
        return y if bias is None else y + bias[lo:hi].to(x.dtype)

    out = x.new_empty(x.shape[0], d_ff)
    for lo in range(0, d_ff, step):
        hi = min(lo + step, d_ff)
        if spec.fused_gate_up:  # [gate; up] along the neuron axis
            z = act(project("gate_up", lo, hi)) * project("gate_up", d_ff + lo, d_ff + hi)
        elif spec.gate is not None:
            z = act(project("gate", lo, hi)) * project("up", lo, hi)
        else:
            z = act(project("up", lo, hi))
        out[:, lo:hi] = z
    return out


def swap_experts(live: Tensor, mass: Tensor, groups: int = 1) -> Tensor:
    """The live map after swaps (:class:`MoeLayerState`, step 2): ``live`` ``[E']`` (the
    original expert in each slot), ``mass`` ``[E]`` each expert's routed mass over the window.
    While the heaviest removed expert has strictly more mass than the lightest kept one, it
    takes that one's slot; ties go to the lower expert index and slot. With ``groups`` > 1
    the ``E`` experts form that many equal contiguous groups and swaps stay inside a group."""
    experts = live.clone()
    size = mass.numel() // groups
    for group in range(groups):
        slots = [s for s in range(len(experts)) if int(experts[s]) // size == group]
        kept = {int(experts[s]) for s in slots}
        removed = [e for e in range(group * size, (group + 1) * size) if e not in kept]
        removed.sort(key=lambda e: (-float(mass[e]), e))
        slots.sort(key=lambda s: (float(mass[experts[s]]), s))
        for expert, slot in zip(removed, slots, strict=False):
            if float(mass[expert]) <= float(mass[experts[slot]]):
                break
            experts[slot] = expert
    return experts


class MoeLayerState:
    """The routed experts of one MoE layer of the live model, refreshed from the original's.

    Attributes:
        experts: ``[E']`` the live map: the original expert whose weights sit in each slot
            (slot ``s``: the live experts tensors' ``[s]``, the live router's row ``s``).
        neurons: ``[E', I']`` the neurons of each slot's expert, ascending (its rows' order).
        ring: the live MoE block's last W inputs while :meth:`GriffinRuntime.generate` runs.

    A refresh (:meth:`refresh`) on the window ``x`` (the live MoE block's inputs, i.e. the
    hidden states the router and every expert read):

    1. *Routing.* The original's MoE block routes ``x`` with all ``E`` experts: the family's
       own routing code on the original's router
       (:func:`~griffin_export.core.moe_selection.route_tokens`). Token ``t`` *goes to* expert
       ``e`` when ``e`` is among its top-k, with routing weight ``w_te``; expert ``e``'s
       *mass* is ``sum_t w_te`` over the window tokens that go to it (the quantity the
       manifest's ``mass_kept`` sums over the prompt).
    2. *Swaps.* While the heaviest removed expert has strictly more mass than the lightest
       kept one, the removed expert takes that kept expert's slot (with group-limited routing,
       within each group, so the groups stay even and every slot stays in its group's range).
    3. *Neurons.* Each slot's expert takes the ``I'`` neurons of the GRIFFIN statistic over
       the window tokens that go to it under the *full* routing of step 1, as the export chose
       them from the full model's routing of the prompt. Not the live (pruned) router's
       tokens: it sends a token whose preferred experts were removed to kept experts it
       ranks lower, so a kept expert's neurons would follow tokens it gets only because its
       betters are missing, and a swapped-in expert would have no tokens at all. An expert
       no window token goes to keeps its neurons.
    4. *Writes.* A slot whose expert or neurons changed gets the original's expert sliced at
       its neurons (:func:`~griffin_export.core.moe.slice_expert`: gate/up, down,
       biases) copied into the slot's existing storage (``tensor[slot].copy_``); a swap also
       copies the expert's router entries (``MoeSpec.router_tensors``: the weight row, a bias,
       a selection bias; and ``MoeSpec.block_tensors``, a selection bias the MoE module
       holds). Nothing is reallocated: the KV cache and every tensor stay valid.

    On a compensated export a rewritten slot's down projection is the plain slice; with
    ``refit_on_refresh`` every slot whose expert has at least
    :data:`~griffin_export.core.moe_selection.MIN_REFIT_TOKENS` window tokens gets its down
    projection refitted on them (as the export refits each expert on its routed prompt
    tokens); other slots keep theirs.
    """

    def __init__(
        self,
        spec: ArchSpec,
        layer: int,
        block: nn.Module,
        full_block: nn.Module,
        experts: Tensor,
        neurons: Tensor,
        *,
        groups: int,
        keep_down: bool,
    ) -> None:
        self.spec, self.layer, self.groups = spec, layer, groups
        live, full = moe_module(spec, block), moe_module(spec, full_block)
        assert live is not None  # the caller passes MoE layers
        assert full is not None
        self.live, self.full = live, full
        self.live_experts, self.full_experts = experts_of(spec, block), experts_of(spec, full_block)
        self.live_router, self.full_router = router_of(spec, block), router_of(spec, full_block)
        weight = router_weight(spec, full_block)  # the original's routing runs where it is
        self._device, self._dtype = weight.device, weight.dtype
        moe = moe_spec(spec)  # per-expert tensors of the router and of the MoE module
        self._per_expert = [
            (self.live_router, self.full_router, n, a) for n, a in moe.router_tensors
        ]
        self._per_expert += [(self.live, self.full, n, a) for n, a in moe.block_tensors]
        self.layout = ExpertsLayout.of(self.full_experts)
        self.total, self.width = expert_count(self.full_experts), expert_width(self.full_experts)
        self.experts = experts.long().clone()
        self.neurons = neurons.long().clone()
        self._export = (self.experts.clone(), self.neurons.clone())
        names = ("down_proj", "down_proj_bias") if self.layout.has_bias else ("down_proj",)
        self._export_down = (
            {name: expert_param(self.live_experts, name).detach().clone() for name in names}
            if keep_down
            else {}
        )
        self.ring: _Ring | None = None

    def codes(self) -> Tensor:
        """The kept (expert, neuron) pairs as ``expert * I + neuron``."""
        return (self.experts[:, None] * self.width + self.neurons).flatten()

    def route(self, rows: Tensor) -> Tensor:
        """``[n, 2E]`` float32 for MoE inputs ``rows``: each row's routing weight per expert
        under the full routing (0 where it does not go), then 1 where it goes."""
        inputs = route_tokens(self.spec, self.full, rows.to(self._device, self._dtype))
        index = inputs.index.long()
        valid = (index >= 0) & (index < self.total)  # outside: a masked slot
        index = index.where(valid, 0)
        out = torch.zeros(index.shape[0], 2 * self.total, device=index.device)
        out[:, : self.total].scatter_add_(1, index, inputs.weights.float() * valid)
        out[:, self.total :].scatter_add_(1, index, valid.float())
        return out

    def refresh(self, compensation: Compensation | None, refit: bool) -> tuple[int, int]:
        """One refresh from :attr:`ring` (class docstring): ``(pairs new to the layer,
        experts swapped in)``."""
        assert self.ring is not None
        routing = self.ring.cached(self.route)  # [W, 2E]
        x = self.ring.contents()
        mass = routing[:, : self.total].double().sum(dim=0).cpu()
        goes = (routing[:, self.total :] > 0).cpu()
        before = self.codes()
        experts = swap_experts(self.experts, mass, self.groups)
        swapped = int((experts != self.experts).sum())
        width = self.neurons.shape[1]
        for slot, expert in enumerate(experts.tolist()):
            tokens = goes[:, expert].nonzero().flatten()
            neurons, z = self.neurons[slot], None
            if tokens.numel():
                rows = x.index_select(0, tokens.to(x.device)).to(self._device)
                z = expert_hidden(self.full_experts, expert, rows)
                _, neurons = choose_experts(normalized_square_sum(z), width, self.layer, z.dtype)
                neurons = neurons.to(self.neurons.device)
            if self._differs(slot, expert, neurons):
                self.place(slot, expert, neurons)
            if refit and compensation is not None and int(tokens.numel()) >= MIN_REFIT_TOKENS:
                assert z is not None
                self._refit(slot, z, compensation)
        return int((~torch.isin(self.codes(), before)).sum()), swapped

    def _differs(self, slot: int, expert: int, neurons: Tensor) -> bool:
        return expert != int(self.experts[slot]) or not torch.equal(neurons, self.neurons[slot])

    @torch.no_grad()
    def place(self, slot: int, expert: int, neurons: Tensor) -> None:
        """Copy the original's expert ``expert`` sliced at ``neurons`` into slot ``slot``,
        and its router entries if another expert sat there; update the live map."""
        for name, value in slice_expert(self.full_experts, expert, neurons).items():
            expert_param(self.live_experts, name)[slot].copy_(value)
        if expert != int(self.experts[slot]):
            for live_owner, full_owner, name, axis in self._per_expert:
                live = router_tensor(live_owner, name)
                full = router_tensor(full_owner, name)
                live.select(axis, slot).copy_(full.select(axis, expert))
        self.experts[slot] = expert
        self.neurons[slot] = neurons

    @torch.no_grad()
    def _refit(self, slot: int, z: Tensor, compensation: Compensation) -> None:
        """Refit slot ``slot``'s down projection on its expert's window activations ``z``."""
        expert = int(self.experts[slot])
        stats = GramStats.zeros(self.width, z.device)
        stats.add(z)
        full_down = expert_down(self.full_experts, expert)
        refit = refit_stored(
            full_down, self.neurons[slot], stats, compensation, self.layout.transposed
        )
        expert_param(self.live_experts, "down_proj")[slot].copy_(refit.weight)
        if refit.bias is not None and self.layout.has_bias:
            full_bias = expert_param(self.full_experts, "down_proj_bias")[expert]
            expert_param(self.live_experts, "down_proj_bias")[slot].copy_(full_bias + refit.bias)

    @torch.no_grad()
    def reset(self) -> int:
        """Put the export's experts back in every slot that differs (and a compensated
        export's down projections, whole); returns how many slots were rewritten."""
        experts, neurons = self._export
        rewritten = 0
        for slot, expert in enumerate(experts.tolist()):
            if expert != int(self.experts[slot]) or not torch.equal(
                neurons[slot], self.neurons[slot]
            ):
                self.place(slot, expert, neurons[slot])
                rewritten += 1
        for name, saved in self._export_down.items():
            expert_param(self.live_experts, name).copy_(saved)
        return rewritten


class GriffinRuntime:
    """Generation with an export, refreshing its experts from the original's weights.

    Attributes:
        model: the live pruned model (its FF weights change in place at each refresh).
        slots: per layer, the original index of the neuron in each live row (slot order) of
            the layer's dense FF: the FF of a dense model, a dense layer of an MoE model, or
            an MoE layer's shared expert (empty for an MoE layer without one).
        moe: per MoE layer (by layer index), its routed experts' live state
            (:class:`MoeLayerState`: which original expert sits in each slot, with which
            neurons); empty for a dense model.

    Each :meth:`generate` call starts from the export's experts (it calls :meth:`reset`); after
    a call, ``model``, ``slots`` and ``moe`` stay as its last refresh left them, for inspection.
    """

    def __init__(
        self,
        export: OpenedExport,
        original: SafetensorsReader | nn.Module,
        *,
        original_device: str | torch.device = "cpu",
        refit_on_refresh: bool | None = None,
    ) -> None:
        """``original``: the original's safetensors, memory-mapped (a dense export), or the
        original loaded as a model (needed for an MoE export: its routed experts are fused in
        memory only); of a loaded model only the FF modules are kept (routers, experts, shared
        experts, dense FF), so the caller may drop the rest."""
        self.export = export
        self.model: Any = export.loaded.model
        self.tokenizer = export.loaded.tokenizer
        self.spec = export.spec
        self.d_ff = int(export.manifest["source"]["d_ff"])
        index_map = load_state([export.directory / EXPERTS_FILE])
        blocks = self.spec.blocks(self.model)
        #: per layer, the dense FF a refresh re-selects like a dense model's (None: none)
        self._ff_specs = [_dense_ff_spec(self.spec, block) for block in blocks]
        self.slots = [_dense_slots(index_map, layer) for layer in range(len(blocks))]
        self._export_slots = [slots.clone() for slots in self.slots]
        self.original = original if isinstance(original, SafetensorsReader) else None
        full_blocks = (
            None if isinstance(original, SafetensorsReader) else self.spec.blocks(original)
        )
        self._full: list[dict[str, Tensor]] = []
        for layer, ff_spec in enumerate(self._ff_specs):
            if ff_spec is None:
                self._full.append({})
            elif full_blocks is None:
                assert isinstance(original, SafetensorsReader)
                self._full.append(_mapped_ff(ff_spec, layer, original, original_device))
            else:
                self._full.append(_module_ff(ff_spec, full_blocks[layer], original_device))
        self._widths = [
            0 if spec is None else ff_width(spec, full)
            for spec, full in zip(self._ff_specs, self._full, strict=True)
        ]
        self._acts = [
            None if spec is None else getattr(spec.mlp_module(block), spec.act)
            for spec, block in zip(self._ff_specs, blocks, strict=True)
        ]
        self._rings: list[_Ring | None] = []
        # A compensated export (griffin_export.core.compensation): its refitted down projections
        # are kept to reset to, and (by default) every refresh refits them on the ring window.
        recorded = export.manifest.get("compensation")
        self.compensation = (
            Compensation(str(recorded["method"]), float(recorded["alpha"])) if recorded else None
        )
        self.refit_on_refresh = _refit_choice(refit_on_refresh, self.compensation is not None)
        self._export_down: list[tuple[Tensor, Tensor | None] | None] = []
        if self.compensation is not None:
            for ff_spec, block in zip(self._ff_specs, blocks, strict=True):
                self._export_down.append(None if ff_spec is None else _saved_down(ff_spec, block))
        self.moe: dict[int, MoeLayerState] = {}
        if self.spec.moe is not None:
            if full_blocks is None:
                raise UsageError(
                    "an MoE export refreshes from its original loaded as a model; use "
                    "GriffinRuntime.from_export"
                )
            for layer, block in enumerate(blocks):
                if is_moe_layer(self.spec, block):
                    self.moe[layer] = MoeLayerState(
                        self.spec,
                        layer,
                        block,
                        full_blocks[layer],
                        index_map[f"layer.{layer}.experts"],
                        index_map[f"layer.{layer}.neurons"],
                        groups=routing_groups(self.spec, self.model.config),
                        keep_down=self.compensation is not None,
                    )
        if next(self.model.parameters()).device.type == "cpu":
            self._store_input_projections_column_major()

    def _store_input_projections_column_major(self) -> None:
        """Re-store the live gate/up (``nn.Linear``, ``[k, hidden]``) weights column-major.

        Same shapes and values, so every consumer is unaffected; ``F.linear`` then multiplies
        by a contiguous ``[hidden, k]`` matrix, which CPU GEMV kernels stream ~1.3x faster
        at batch 1 (benchmarks/bench_decode.py measures it on the full model too). GPT-2's
        ``Conv1D`` already stores ``[in, out]``; refresh copies work on either layout.
        """
        for ff_spec, block in zip(self._ff_specs, self.spec.blocks(self.model), strict=True):
            if ff_spec is None:
                continue
            for role, module in ff_spec.projections(block).items():
                if role in INPUT_ROLES and isinstance(module, nn.Linear):
                    weight = module.weight.detach()
                    module.weight = nn.Parameter(weight.T.contiguous().T, requires_grad=False)

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        original: str | None = None,
        *,
        device: str = "cpu",
        original_on_device: bool = False,
        refit_on_refresh: bool | None = None,
    ) -> GriffinRuntime:
        """Load ``export_dir`` for generation, with its original memory-mapped.

        ``original`` defaults to the source recorded in the manifest (for GGUF and the embedded
        model: the cached safetensors conversion). It is checked against the manifest's
        fingerprint, and a different model is refused. ``original_on_device`` copies the
        original's FF weights to ``device`` (faster refreshes when they fit).
        ``refit_on_refresh``: on a compensated export, refit the down projections on the ring
        window at each refresh (``None``: :data:`DEFAULT_REFIT_ON_REFRESH`); ``False`` slices
        the original's plain columns for every layer whose experts changed. ``True`` on an
        export without compensation is refused.

        An MoE export's original is loaded as a model instead (transformers fuses its routed
        experts on loading; the files hold them per expert): the whole model is read once,
        then everything but its FF modules (routers, routed and shared experts, dense FF) is
        dropped.
        """
        export = open_export(export_dir, device)
        original_device = device if original_on_device else "cpu"
        if export.spec.moe is not None:
            full = load_original(export.directory, export.manifest, original, original_device)
            return cls(
                export,
                full.model,
                original_device=original_device,
                refit_on_refresh=refit_on_refresh,
            )
        source = original_source(export.manifest, original)
        check_original(export.directory, source.directory)
        mapped = SafetensorsReader.open(source.directory)
        return cls(
            export,
            mapped,
            original_device=original_device,
            refit_on_refresh=refit_on_refresh,
        )

    def _dense_layers(self) -> list[tuple[int, ArchSpec, nn.Module]]:
        """``(layer, spec, block)`` of every layer with a dense FF (:attr:`slots`)."""
        blocks = self.spec.blocks(self.model)
        return [
            (layer, ff_spec, block)
            for layer, (ff_spec, block) in enumerate(zip(self._ff_specs, blocks, strict=True))
            if ff_spec is not None
        ]

    def reset(self) -> int:
        """Put the export's experts back, slot for slot (so the live weights equal the export's
        again, bit for bit), copying only the rows that differ into the existing storage.
        Returns how many slots were rewritten (neurons; routed experts count one each).
        :meth:`generate` calls it first."""
        rewritten = 0
        for layer, ff_spec, block in self._dense_layers():
            want, slots = self._export_slots[layer], self.slots[layer]
            positions = (slots != want).nonzero().flatten()
            if positions.numel():
                self._write(layer, block, positions, want[positions])
                slots[positions] = want[positions]
                rewritten += int(positions.numel())
            saved = self._export_down[layer] if self._export_down else None
            if saved is not None:  # the export's refitted down projection, whole
                _restore_down(ff_spec, block, saved)
        for state in self.moe.values():
            rewritten += state.reset()
        return rewritten

    def refresh(self, token_index: int = 0, *, record_kept: bool = False) -> RefreshEvent:
        """Re-select every layer's experts from its ring buffer and copy changed neurons in;
        on an MoE layer also swap whole routed experts (:meth:`MoeLayerState.refresh`)."""
        started = time.perf_counter()
        kept: list[list[int]] = []
        experts: list[list[int]] = []
        overlap: list[float] = []
        changed: list[int] = []
        swapped: list[int] = []
        blocks = self.spec.blocks(self.model)
        rings = [ring for ring in self._rings if ring is not None]
        rings += [state.ring for state in self.moe.values() if state.ring is not None]
        if not rings or any(ring.rows is None for ring in rings):
            raise UsageError(
                "refresh() re-selects from the tokens of a running generate(), and none have "
                "been seen; call generate(..., refresh_every=N) with N > 0 instead"
            )
        for layer, block in enumerate(blocks):
            before, after, copied = self._refresh_dense(layer, block)
            state = self.moe.get(layer)
            if state is None:
                swapped.append(0)
            else:  # one index set per layer: routed (expert, neuron) pairs, then the shared
                offset = state.total * state.width
                codes = state.codes()
                copied_experts, swaps = state.refresh(self.compensation, self.refit_on_refresh)
                before = torch.cat([codes, before + offset])
                after = torch.cat([state.codes(), after + offset])
                copied += copied_experts
                swapped.append(swaps)
            changed.append(copied)
            overlap.append(jaccard(before, after))
            if record_kept:
                kept.append(self.slots[layer].tolist())
                experts.append([] if state is None else state.experts.tolist())
        seconds = time.perf_counter() - started
        return RefreshEvent(
            token_index,
            overlap,
            changed,
            seconds,
            kept if record_kept else None,
            swapped=swapped,
            experts=experts if record_kept and self.moe else None,
        )

    def _refresh_dense(self, layer: int, block: nn.Module) -> tuple[Tensor, Tensor, int]:
        """Re-select ``layer``'s dense FF (if any) from its ring: ``(kept before, kept
        after, neurons copied)``."""
        ring = self._rings[layer] if self._rings else None
        ff_spec = self._ff_specs[layer]
        current = self.slots[layer].clone()
        if ring is None or ff_spec is None:
            return current, current, 0
        z = ring.cached(partial(self._activations, layer))  # [W, d_ff]
        sums = normalized_squares(z).sum(dim=0)
        _, new = choose_experts(sums, current.numel(), layer, z.dtype)
        copied = self._swap_in(layer, block, new)
        if self.refit_on_refresh:
            self._refit(layer, block, z)
        elif self.compensation is not None and copied:
            self._plain_down(layer, block)
        return current, new, copied

    def _activations(self, layer: int, x: Tensor) -> Tensor:
        """Buffered MLP inputs' full-width down-projection inputs, from the original's
        weights (each row's term of the statistic and the refit's regressors)."""
        full = self._full[layer]
        act = self._acts[layer]
        ff_spec = self._ff_specs[layer]
        assert act is not None
        assert ff_spec is not None
        x = x.to(next(iter(full.values())).device)
        return full_activations(ff_spec, act, full, x)

    def _refit(self, layer: int, block: nn.Module, z: Tensor) -> None:
        """Refit the live down projection's kept columns (slot order) on the ring window's
        full-width activations ``z``, as ``griffin export`` refits on the prompt."""
        assert self.compensation is not None
        ff_spec = self._ff_specs[layer]
        assert ff_spec is not None
        full = self._full[layer]
        stats = GramStats.zeros(self._widths[layer], z.device)
        stats.add(z)
        refit = refit_stored(
            full["down"], self.slots[layer], stats, self.compensation, ff_spec.transposed
        )
        live, live_bias = _down_tensors(ff_spec, block)
        with torch.no_grad():
            live.copy_(refit.weight)
            if refit.bias is not None and live_bias is not None:
                live_bias.copy_(full["down.bias"] + refit.bias)

    def _plain_down(self, layer: int, block: nn.Module) -> None:
        """The live down projection as the plain slice of the original's at the current slots
        (every slot, also those of neurons kept from before), and the original's down bias."""
        ff_spec = self._ff_specs[layer]
        assert ff_spec is not None
        slots = self.slots[layer]
        live, live_bias = _down_tensors(ff_spec, block)
        positions = torch.arange(slots.numel())
        self._copy(live, self._full[layer]["down"], ff_spec.neuron_axis("down"), positions, slots)
        if live_bias is not None and "down.bias" in self._full[layer]:
            with torch.no_grad():
                live_bias.copy_(self._full[layer]["down.bias"])

    def _swap_in(self, layer: int, block: nn.Module, new: Tensor) -> int:
        """Make the live block serve neurons ``new``: dropped neurons' slots take the added ones.
        Returns how many neurons were copied."""
        slots = self.slots[layer]
        leaving = (~torch.isin(slots, new)).nonzero().flatten()  # slot positions to overwrite
        arriving = new[~torch.isin(new, slots)]  # original neuron indices to copy in
        if leaving.numel() == 0:
            return 0
        self._write(layer, block, leaving, arriving)
        slots[leaving] = arriving
        return int(leaving.numel())

    def _write(self, layer: int, block: nn.Module, positions: Tensor, neurons: Tensor) -> None:
        """Copy the original's neurons ``neurons`` into the live slots ``positions``."""
        ff_spec = self._ff_specs[layer]
        assert ff_spec is not None
        k = self.slots[layer].numel()
        for role, module in ff_spec.projections(block).items():
            axis = ff_spec.neuron_axis(role)
            dst, src = positions, neurons
            if role == "gate_up":  # [gate; up]: live rows s and k + s, original j and d_ff + j
                dst, src = (
                    torch.cat([positions, positions + k]),
                    torch.cat([neurons, neurons + self._widths[layer]]),
                )
            self._copy(module.weight, self._full[layer][role], axis, dst, src)
            bias = getattr(module, "bias", None)
            if role in INPUT_ROLES and isinstance(bias, Tensor):
                self._copy(bias, self._full[layer][f"{role}.bias"], 0, dst, src)

    @staticmethod
    def _copy(live: Tensor | nn.Module, full: Tensor, axis: int, dst: Tensor, src: Tensor) -> None:
        assert isinstance(live, Tensor)
        rows = full.index_select(axis, src.to(full.device)).to(live.device, live.dtype)
        with torch.no_grad():
            live.index_copy_(axis, dst.to(live.device), rows)

    # -- generation -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        refresh_every: int = 64,
        window: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        chat: bool = False,
        record_kept: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` (batch 1), greedy unless ``temperature`` > 0.

        Starts from the export's experts (:meth:`reset`), whatever earlier calls refreshed.
        Every ``refresh_every`` generated tokens (0 = never) the experts are re-chosen from the
        last ``window`` MLP inputs (with refresh off no inputs are recorded). Sampling without a
        ``seed`` draws one from OS entropy; the result records the seed used. Stops at any of
        the model's end tokens (``generation_config.eos_token_id``, an id or a list, and the
        tokenizer's EOS) unless ``stop_at_eos`` is False. ``chat`` wraps the prompt as one user
        turn in the tokenizer's chat template. ``record_kept`` keeps every refresh's full kept
        lists (:class:`RefreshEvent`). ``on_token(id)`` is called as each token is produced.
        """
        _check_generation_options(max_new_tokens, refresh_every, window, temperature, top_p, top_k)
        tokenizer = require_tokenizer(self.tokenizer, self.export.directory)
        if not prompt.strip():
            raise UsageError("the prompt is empty; pass --prompt FILE or --prompt-text TEXT")
        device = next(self.model.parameters()).device
        ids = torch.tensor([_prompt_ids(tokenizer, prompt, chat)], device=device)
        if seed is None and temperature > 0:
            seed = secrets.randbits(63)
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        stop = self.stop_ids() if stop_at_eos else set()
        self.reset()
        # Step j of the schedule is generated token j's forward (origin: the prompt's last
        # position); a ring of the last ``window`` MLP inputs is what its refreshes look back on.
        # An MoE layer's ring holds its MoE block's inputs (what the router and every expert
        # read); a dense FF's (a dense layer's, a shared expert's) its first projection's.
        schedule = RefreshSchedule(refresh_every, window)
        self._rings = []
        handles = []
        if schedule.every:
            for layer, (ff_spec, block) in enumerate(
                zip(self._ff_specs, self.spec.blocks(self.model), strict=True)
            ):
                ring = None
                if ff_spec is not None:
                    ring = _Ring(window)
                    first = ff_spec.projections(block)[ff_spec.roles()[0]]
                    handles.append(first.register_forward_pre_hook(partial(_record, ring)))
                self._rings.append(ring)
                state = self.moe.get(layer)
                if state is not None:
                    state.ring = _Ring(window)
                    hook = partial(_record, state.ring)
                    handles.append(state.live.register_forward_pre_hook(hook))
        events: list[RefreshEvent] = []

        def between(done: int) -> None:
            if schedule.due(done):
                events.append(self.refresh(done, record_kept=record_kept))

        started = time.perf_counter()
        try:
            generated = decode(
                self.model,
                ids,
                max_new_tokens,
                lambda logits: _sample(logits, temperature, top_p, top_k, generator),
                stop=stop,
                on_token=on_token,
                between=between,
            )
        finally:
            for handle in handles:
                handle.remove()
        seconds = time.perf_counter() - started
        text = tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(text, generated, ids.shape[1], seconds, events, seed)

    def stop_ids(self) -> set[int]:
        """The ids that end generation: ``generation_config.eos_token_id`` (an id or a list,
        e.g. Llama 3's ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's EOS."""
        config = getattr(self.model, "generation_config", None)
        found: set[int] = set()
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        for value in (getattr(config, "eos_token_id", None), tokenizer_eos):
            if isinstance(value, int):
                found.add(value)
            elif value is not None:
                found.update(int(v) for v in value)
        return found


def _refit_choice(asked: bool | None, compensated: bool) -> bool:
    """The runtime's ``refit_on_refresh``: the default for a compensated export, never for
    one without compensation (asking for it there is refused)."""
    if asked and not compensated:
        raise UsageError(
            "--refit-on-refresh needs a compensated export (griffin export --compensate "
            "refit, the default); this one was exported with --compensate none: drop the "
            "option or re-export"
        )
    return compensated and (DEFAULT_REFIT_ON_REFRESH if asked is None else asked)


def ff_width(spec: ArchSpec, full: dict[str, Tensor]) -> int:
    """The width of a dense FF from its tensors (``role`` / ``role.bias`` to tensors)."""
    first = spec.roles()[0]
    return full[first].shape[spec.neuron_axis(first)] // (2 if spec.fused_gate_up else 1)


def _dense_ff_spec(spec: ArchSpec, block: nn.Module) -> ArchSpec | None:
    """The dense FF of ``block`` the runtime refreshes like a dense model's: the FF of a dense
    model or of an MoE model's dense layer, an MoE layer's shared expert, else ``None``."""
    if spec.moe is None:
        return spec
    if not is_moe_layer(spec, block):
        return dense_spec(spec)
    return shared_spec(spec) if shared_present(spec, block) else None


def _dense_slots(index_map: dict[str, Tensor], layer: int) -> Tensor:
    """A layer's dense FF neurons in the kept-index map (``layer.<i>``, or an MoE layer's
    shared expert's ``layer.<i>.shared``); empty for an MoE layer without a shared expert."""
    for key in (f"layer.{layer}", f"layer.{layer}.shared"):
        if key in index_map:
            return index_map[key].long()
    return torch.empty(0, dtype=torch.long)


def _mapped_ff(
    spec: ArchSpec, layer: int, original: SafetensorsReader, device: str | torch.device
) -> dict[str, Tensor]:
    """One layer's FF tensors (``role`` / ``role.bias``), memory-mapped from the original."""
    tensors: dict[str, Tensor] = {}
    for role in spec.roles():
        for kind, suffix in (("weight", ""), ("bias", ".bias")):
            key = spec.param_name(layer, role, kind)
            if key in original:
                tensors[role + suffix] = original.map(key).to(device)
    return tensors


def _module_ff(spec: ArchSpec, block: nn.Module, device: str | torch.device) -> dict[str, Tensor]:
    """One dense FF's tensors (``role`` / ``role.bias``) from a loaded original's block."""
    tensors: dict[str, Tensor] = {}
    for role, module in spec.projections(block).items():
        for kind, suffix in (("weight", ""), ("bias", ".bias")):
            value = getattr(module, kind, None)
            if isinstance(value, Tensor):
                tensors[role + suffix] = value.detach().to(device)
    return tensors


def _saved_down(spec: ArchSpec, block: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A copy of the live down projection's weight and bias (to reset to)."""
    weight, bias = _down_tensors(spec, block)
    return weight.detach().clone(), None if bias is None else bias.detach().clone()


@torch.no_grad()
def _restore_down(spec: ArchSpec, block: nn.Module, saved: tuple[Tensor, Tensor | None]) -> None:
    weight, bias = saved
    live, live_bias = _down_tensors(spec, block)
    live.copy_(weight)
    if bias is not None and live_bias is not None:
        live_bias.copy_(bias)


def _record(ring: _Ring, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Forward pre-hook: the module's input rows into ``ring``."""
    ring.write(args[0].reshape(-1, args[0].shape[-1]))


def _down_tensors(spec: ArchSpec, block: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The live down projection's weight and bias (``None`` without one)."""
    down = spec.down_module(block)
    weight, bias = down.weight, getattr(down, "bias", None)
    assert isinstance(weight, Tensor)
    return weight, bias if isinstance(bias, Tensor) else None


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids; with ``chat``, as one user turn in the chat template."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "--chat: the export's tokenizer has no chat template; drop --chat and write "
            "the prompt in the model's own format"
        )
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])


class TextStream:
    """Text pieces as tokens arrive, for streaming: ``write(piece)`` gets each new piece once.

    Incremental detokenisation: each token decodes only a short window (the tokens since the
    previous piece plus the one before it, for context such as a leading space), so a long run
    costs O(n), not the O(n^2) of re-decoding everything; a piece ending in an incomplete UTF-8
    sequence (U+FFFD) is held until the next token completes it (:attr:`pending` holds it
    meanwhile). The pieces, then :attr:`pending`, concatenate to the decoded text. Special
    tokens are skipped, as in :class:`GenerationResult` ``.text``, unless
    ``skip_special_tokens`` is False.
    """

    def __init__(
        self, tokenizer: Any, write: Callable[[str], None], *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._write = write
        self._skip = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here have been written
        #: The decoded text of the tokens not written yet (held back, or nothing).
        self.pending = ""

    def _decode(self, stop: int) -> str:
        tokens = self._tokens[self._prefix : stop]
        return str(self._tokenizer.decode(tokens, skip_special_tokens=self._skip))

    def put(self, token: int) -> None:
        self._tokens.append(token)
        self._flush(final=False)

    def end(self) -> None:
        """Write whatever is held back (an incomplete sequence at the very end)."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        before, after = self._decode(self._read), self._decode(len(self._tokens))
        self.pending = after[len(before) :]
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._write(self.pending)
            self.pending = ""
            self._prefix, self._read = self._read, len(self._tokens)


class StopStrings:
    """Whether the text of the tokens so far contains any of ``stops`` (empty ones never
    match), decoded incrementally (:class:`TextStream`, special tokens kept): :meth:`put`
    searches only the text that is new since the previous token plus the ``len(stop) - 1``
    characters before it, so a run costs O(n), and it answers exactly as searching the
    decode of all the tokens after each one would."""

    def __init__(self, tokenizer: Any, stops: Collection[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._overlap = max((len(stop) - 1 for stop in self._stops), default=0)
        self._tail = ""  # the written text's last _overlap characters, then new pieces
        self._stream = TextStream(tokenizer, self._append, skip_special_tokens=False)

    def _append(self, piece: str) -> None:
        self._tail += piece

    def put(self, token: int) -> bool:
        """Add ``token``; True when a stop string appears in the text so far."""
        self._stream.put(token)
        text = self._tail + self._stream.pending
        self._tail = self._tail[max(0, len(self._tail) - self._overlap) :]
        return any(stop in text for stop in self._stops)


@torch.inference_mode()
def decode(
    model: Any,
    ids: Tensor,
    max_new_tokens: int,
    pick: Callable[[Tensor], int],
    *,
    stop: Collection[int] = (),
    on_token: Callable[[int], None] | None = None,
    between: Callable[[int], None] | None = None,
) -> list[int]:
    """The decode loop of the runtime (and of the benchmark's full-model reference).

    Prefill ``ids`` ``[1, T]``, then one token per forward with the KV cache, computing logits
    for the last position only. ``pick`` turns logits ``[V]`` into a token; a token in
    ``stop`` ends the loop (it is kept); ``between(n)`` runs after the n-th token, before the
    next forward.
    """
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1]
        if not bool(torch.isfinite(logits).all()):  # never decode token 0 from nan
            dtype = next(model.parameters()).dtype
            raise UsageError(non_finite_message("the model's logits", dtype))
        token = pick(logits)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or step == max_new_tokens - 1:
            break
        if between is not None:
            between(step + 1)
        next_ids = torch.tensor([[token]], device=ids.device)
        out = model(input_ids=next_ids, cache=out.cache, use_cache=True, logits_to_keep=1)
    return generated


def _check_generation_options(
    max_new_tokens: int,
    refresh_every: int,
    window: int,
    temperature: float,
    top_p: float,
    top_k: int,
) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if refresh_every < 0:
        raise UsageError(f"--refresh must be 0 (off) or a positive period, got {refresh_every}")
    if window < 1:
        raise UsageError(f"--window must be at least 1 token, got {window}")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {top_k}")


def _sample(
    logits: Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """Greedy when ``temperature`` is 0; else temperature, top-k and nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
