"""``griffin verify`` on mixture-of-experts exports (a manifest with a ``moe`` record).

The checks of :mod:`griffin_export.formats.verify` for the parts a dense export lacks:

* the kept-index map's MoE entries (``layer.<i>.experts`` ``[E']`` ascending, distinct,
  below ``E``; ``layer.<i>.neurons`` ``[E', I']``, each row ascending, distinct, below ``I``;
  ``layer.<i>.shared``; dense ``layer.<i>``) against the manifest's ``moe`` record;
* the config's own keys (the family's :class:`~griffin_export.core.architectures.MoeSpec`
  row: expert count, expert width, shared width, dense width) against the record;
* every tensor of every FF (routers, experts, shared experts, dense layers) against the
  shapes the export's config builds (a model on the meta device: no memory);
* with the original, every kept expert's slab against the original's expert at the kept
  neurons, router rows, shared experts and dense layers, read one tensor (one expert) at a
  time.

Checkpoints name expert tensors their own way (Mixtral's ``experts.<e>.w1``, Qwen's
``experts.<e>.gate_proj``, granite's fused ``input_linear``); :class:`ModuleReader` reads a
checkpoint by the model's parameter names through transformers' own conversion mapping, so
no family's on-disk names are written here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import INPUT_ROLES, ArchSpec
from griffin_export.core.moe import (
    ExpertsLayout,
    config_int,
    dense_spec,
    experts_of,
    is_moe_layer,
    moe_spec,
    router_of,
    shared_spec,
    slice_expert_tensors,
)
from griffin_export.core.moe_selection import MoeSizes
from griffin_export.core.slicing import fused_indices
from griffin_export.errors import ExportFormatError, UnsupportedArchitectureError
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST, is_int
from griffin_export.storage.safetensors_io import SafetensorsReader

#: the record's sizes that every MoE export has, and those only some have
_SIZES_REQUIRED = ("experts", "experts_total", "width", "width_total")
_SIZES_OPTIONAL = ("dense", "dense_total", "shared", "shared_total")


# -- reading a checkpoint by the model's names ------------------------------------------------


@dataclass(frozen=True)
class CheckpointKey:
    """Where one checkpoint tensor goes in the model: parameter ``module``; a per-expert
    piece (``expert`` set) is part ``part`` of ``parts`` concatenated along ``axis`` of the
    expert's slab (Mixtral's ``w1``/``w3`` into ``gate_up_proj``)."""

    module: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    axis: int = 0


def checkpoint_keys(model_type: str, keys: Iterable[str]) -> dict[str, CheckpointKey | str]:
    """``{checkpoint key: CheckpointKey}`` through transformers' conversion mapping for
    ``model_type`` (renamings, then at most one converter, as ``from_pretrained`` applies
    them). A key behind a converter that is not a per-expert merge (with an optional
    concatenation), e.g. a fused attention projection that loading splits, maps to the reason
    it cannot be read by name instead."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        apply_renamings,
    )

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, CheckpointKey | str] = {}
    for key in keys:
        renamed = apply_renamings(key, renamings)
        out[key] = CheckpointKey(renamed)
        for converter in converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is None:
                continue
            ops = list(converter.operations)
            found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
            merge = ops[:1] and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            concat = [op for op in ops[1:] if isinstance(op, Concatenate)]
            if found is None or not found.groups() or not merge or len(ops) != 1 + len(concat):
                out[key] = (
                    f"'{key}' loads through a conversion "
                    f"({', '.join(type(op).__name__ for op in ops)}) that verify does not read"
                )
                break
            patterns = list(converter.source_patterns)
            out[key] = CheckpointKey(
                module=target,
                expert=int(found.group(1)),
                part=patterns.index(pattern),
                parts=len(patterns),
                axis=concat[0].dim - 1 if concat else 0,
            )
            break
    return out


class ModuleReader:
    """A safetensors checkpoint read by the model's parameter names (:func:`checkpoint_keys`):
    a plain tensor, or one expert's slab of a fused experts tensor whether the checkpoint
    stores it fused or one piece per expert. Only what is asked for is read."""

    def __init__(self, reader: SafetensorsReader, model_type: str) -> None:
        self.reader = reader
        self.plain: dict[str, str] = {}
        #: module name -> expert -> part -> checkpoint key
        self.pieces: dict[str, dict[int, dict[int, str]]] = {}
        self.layout: dict[str, CheckpointKey] = {}
        #: why some checkpoint tensors cannot be read by the model's names
        self.unreadable: list[str] = []
        for key, where in checkpoint_keys(model_type, reader.keys()).items():
            if isinstance(where, str):
                self.unreadable.append(where)
                continue
            if where.expert is None:
                self.plain[where.module] = key
                continue
            self.pieces.setdefault(where.module, {}).setdefault(where.expert, {})[where.part] = key
            self.layout[where.module] = where

    def __contains__(self, name: str) -> bool:
        return name in self.plain or name in self.pieces

    def names(self) -> list[str]:
        return [*self.plain, *self.pieces]

    def checkpoint_keys(self, name: str) -> list[str]:
        if name in self.plain:
            return [self.plain[name]]
        return [k for parts in self.pieces.get(name, {}).values() for k in parts.values()]

    def shape(self, name: str) -> tuple[int, ...]:
        """The model tensor's shape; raises ``ExportFormatError`` naming what is missing or uneven
        among per-expert pieces."""
        if name in self.plain:
            return self.reader.shape(self.plain[name])
        where, experts = self.layout[name], self.pieces[name]
        if sorted(experts) != list(range(len(experts))):
            raise ExportFormatError(
                f"{name}: the checkpoint holds experts {_ranges(sorted(experts))}, not "
                f"0..{len(experts) - 1}"
            )
        complete = all(p in parts for parts in experts.values() for p in range(where.parts))
        shapes = {self.reader.shape(k) for parts in experts.values() for k in parts.values()}
        if not complete or len(shapes) != 1:
            raise ExportFormatError(
                f"{name}: its per-expert pieces are missing or of unequal shapes"
            )
        piece = list(next(iter(shapes)))
        piece[where.axis] *= where.parts
        return (len(experts), *piece)

    def get(self, name: str) -> Tensor:
        return self.reader.get(self.plain[name])

    def select(self, name: str, index: Tensor, axis: int) -> Tensor:
        return self.reader.select(self.plain[name], index, axis)

    def flat(self, name: str, start: int, stop: int) -> Tensor:
        return self.reader.flat(self.plain[name], start, stop)

    def expert(self, name: str, expert: int) -> Tensor:
        """Expert ``expert``'s slab of the fused experts tensor ``name`` (only it is read)."""
        if name in self.plain:
            return self.reader.select(self.plain[name], torch.tensor([expert]), 0)[0]
        where, parts = self.layout[name], self.pieces[name][expert]
        return torch.cat([self.reader.get(parts[p]) for p in range(where.parts)], where.axis)


def meta_model(config: Any) -> nn.Module:
    """The model ``config`` describes, on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -- the manifest's record and the kept-index map ----------------------------------------------


@dataclass
class MoeLayerKeep:
    """One MoE layer's entries of the kept-index map."""

    experts: Tensor
    neurons: Tensor
    shared: Tensor | None = None


#: per layer: a dense layer's kept neurons, or an MoE layer's kept experts and neurons
KeptLayer = Tensor | MoeLayerKeep


@dataclass
class MoeRecord:
    """The manifest's ``moe`` record, read: the sizes and the MoE layers' kept experts."""

    sizes: MoeSizes
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def is_moe(self, layer: int) -> bool:
        return layer in self.layers


def read_record(manifest: dict[str, Any], problems: list[str]) -> MoeRecord | None:
    """The manifest's ``moe`` record, or ``None`` (with the problems) when it is malformed."""
    record = manifest["moe"]
    sizes, layers = record["sizes"], record["layers"]
    n_layers = len(manifest["k_per_layer"])
    where = f"{MANIFEST} moe"
    found: list[str] = []
    for name in _SIZES_REQUIRED:
        if not is_int(sizes.get(name)) or sizes[name] < 1:
            found.append(f"sizes.{name} is {sizes.get(name)!r}, not a positive integer")
    for name in _SIZES_OPTIONAL:
        if sizes.get(name) is not None and (not is_int(sizes[name]) or sizes[name] < 1):
            found.append(f"sizes.{name} is {sizes[name]!r}, not a positive integer or null")
    kept: dict[int, dict[str, Any]] = {}
    for entry in layers:
        layer = entry.get("layer") if isinstance(entry, dict) else None
        experts = entry.get("experts") if isinstance(entry, dict) else None
        if not isinstance(layer, int) or not is_int(layer) or not 0 <= layer < n_layers:
            found.append(f"layers: entry {entry!r} names no layer")
        elif layer in kept:
            found.append(f"layers: layer {layer} is listed twice")
        elif not isinstance(experts, list) or not all(is_int(e) for e in experts):
            found.append(f"layer {layer}: experts is {experts!r}, not a list of integers")
        else:
            kept[layer] = entry
    if not found and not kept:
        found.append("layers: no MoE layer is listed")
    if found:
        problems.extend(f"{where}: {line}; re-export" for line in found)
        return None
    return MoeRecord(MoeSizes(**{k: sizes.get(k) for k in _SIZES_REQUIRED + _SIZES_OPTIONAL}), kept)


def index_problems(index: Tensor, k: int, bound: int) -> list[str]:
    """What is wrong with one row of kept indices: its length ``k``, range ``0..bound-1``,
    duplicates, ascending order (empty when it is sound)."""
    found: list[str] = []
    if index.numel() != k:
        found.append(f"{index.numel()} indices but k is {k}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        found.append(f"indices outside 0..{bound - 1}")
    if index.unique().numel() != index.numel():
        found.append("duplicate indices")
    elif index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        found.append("indices not sorted ascending")
    return found


def check_index_map(
    tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    record: MoeRecord,
    problems: list[str],
) -> list[KeptLayer] | None:
    """Validate an MoE export's kept-index map against its manifest; the per-layer entries
    when usable (indices as int64)."""
    sizes, ks = record.sizes, manifest["k_per_layer"]
    expected: set[str] = set()
    for i in range(len(ks)):
        if record.is_moe(i):
            expected |= {f"layer.{i}.experts", f"layer.{i}.neurons"}
            if sizes.shared is not None:
                expected.add(f"layer.{i}.shared")
        else:
            expected.add(f"layer.{i}")
    for extra in sorted(set(tensors) - expected):
        problems.append(
            f"{EXPERTS_FILE}: unexpected entry '{extra}' (the {MANIFEST} moe record lists MoE "
            f"layers {sorted(record.layers)}); re-export"
        )
    kept: list[KeptLayer] = []
    usable = True
    for i, k in enumerate(ks):
        if not record.is_moe(i):
            index = _entry(tensors, f"layer.{i}", 1, problems)
            total, want = sizes.dense_total, sizes.dense
            if index is None or total is None or want is None:
                if total is None or want is None:
                    problems.append(
                        f"{MANIFEST}: layer {i} is dense but the moe record's sizes have no "
                        "dense width; re-export"
                    )
                usable = False
                continue
            if k != want:
                problems.append(
                    f"{MANIFEST}: k_per_layer[{i}] is {k} but the moe record keeps {want} "
                    "neurons per dense layer; re-export"
                )
            found = index_problems(index, want, total)
            if found:
                problems.append(f"{EXPERTS_FILE} layer.{i}: {'; '.join(found)}; re-export")
                usable = False
            kept.append(index)
            continue
        choice = _moe_entries(tensors, i, k, record, problems)
        usable = usable and choice is not None
        if choice is not None:
            kept.append(choice)
    return kept if usable else None


def _moe_entries(
    tensors: dict[str, Tensor], i: int, k: int, record: MoeRecord, problems: list[str]
) -> MoeLayerKeep | None:
    sizes = record.sizes
    experts = _entry(tensors, f"layer.{i}.experts", 1, problems)
    neurons = _entry(tensors, f"layer.{i}.neurons", 2, problems)
    shared = None
    if sizes.shared is not None:
        shared = _entry(tensors, f"layer.{i}.shared", 1, problems)
    if experts is None or neurons is None or (sizes.shared is not None and shared is None):
        return None
    usable = True
    if k != sizes.width:
        problems.append(
            f"{MANIFEST}: k_per_layer[{i}] is {k} but the moe record keeps {sizes.width} "
            "neurons per routed expert; re-export"
        )
    found = index_problems(experts, sizes.experts, sizes.experts_total)
    if found:
        problems.append(
            f"{EXPERTS_FILE} layer.{i}.experts: {'; '.join(found)} (of "
            f"{sizes.experts_total} routed experts); re-export"
        )
        usable = False
    recorded = record.layers[i]["experts"]
    if experts.tolist() != recorded:
        problems.append(
            f"{EXPERTS_FILE} layer.{i}.experts: keeps experts {experts.tolist()} but the "
            f"{MANIFEST} moe record says {recorded}; re-export"
        )
        usable = False
    if tuple(neurons.shape) != (experts.numel(), sizes.width):
        problems.append(
            f"{EXPERTS_FILE} layer.{i}.neurons: shape {tuple(neurons.shape)}, expected "
            f"({experts.numel()}, {sizes.width}) (one row of kept neurons per kept expert); "
            "re-export"
        )
        return None
    for row, expert in zip(neurons, experts.tolist(), strict=True):
        found = index_problems(row, sizes.width, sizes.width_total)
        if found:
            problems.append(
                f"{EXPERTS_FILE} layer.{i}.neurons, the row of expert {expert}: "
                f"{'; '.join(found)}; re-export"
            )
            usable = False
    if shared is not None and sizes.shared is not None and sizes.shared_total is not None:
        found = index_problems(shared, sizes.shared, sizes.shared_total)
        if found:
            problems.append(f"{EXPERTS_FILE} layer.{i}.shared: {'; '.join(found)}; re-export")
            usable = False
    return MoeLayerKeep(experts, neurons, shared) if usable else None


def _entry(tensors: dict[str, Tensor], name: str, dims: int, problems: list[str]) -> Tensor | None:
    index = tensors.get(name)
    if index is None:
        problems.append(f"{EXPERTS_FILE} {name}: missing; re-export")
        return None
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != dims:
        problems.append(
            f"{EXPERTS_FILE} {name}: expected a {dims}-D integer tensor, found {index.dtype!s} "
            f"of shape {tuple(index.shape)}; re-export"
        )
        return None
    return index.long()


# -- the config and the weights' shapes --------------------------------------------------------


def config_problems(spec: ArchSpec, config: Any, record: MoeRecord) -> list[str]:
    """The config's own keys (the family's MoeSpec row, read through the config class, so
    its attribute aliases hold) against the record's sizes."""
    moe, sizes = moe_spec(spec), record.sizes
    wanted: list[tuple[str, int, str]] = [
        (moe.count_key, sizes.experts, "routed experts per layer"),
        (moe.width_key, sizes.width, "neurons per routed expert"),
    ]
    if sizes.dense is not None and spec.size_key != moe.width_key:
        wanted.append((spec.size_key, sizes.dense, "neurons per dense layer"))
    found = []
    for key, want, what in wanted:
        value = getattr(config, key, None)
        if value != want:
            found.append(
                f"config.json: {key} is {value!r} but {MANIFEST} keeps {want} {what}; set it "
                f"to {want} or re-export"
            )
    if sizes.shared is not None:
        if moe.shared_width_key is not None:
            value = getattr(config, moe.shared_width_key, None)
            key = moe.shared_width_key
        else:  # derived: shared count (1 without a count field) x routed width
            count = getattr(config, moe.shared_count_key, None) if moe.shared_count_key else 1
            key = f"{moe.shared_count_key or '1'} x {moe.width_key}"
            value = count * sizes.width if isinstance(count, int) else count
        if value != sizes.shared:
            found.append(
                f"config.json: {key} is {value!r} but {MANIFEST} keeps {sizes.shared} "
                "shared-expert neurons; re-export"
            )
    try:
        top_k = config_int(config, moe.top_k_key, 1)
    except UnsupportedArchitectureError as exc:
        found.append(f"config.json: {exc}; re-export")
        top_k = 1
    if top_k > sizes.experts:
        found.append(
            f"config.json: {moe.top_k_key} is {top_k} but only {sizes.experts} routed experts "
            "are kept; re-export"
        )
    return found


def ff_names(spec: ArchSpec, model: nn.Module, layer: int) -> Iterator[tuple[str, Tensor]]:
    """``(parameter name, tensor)`` of layer ``layer``'s FF: an MoE layer's whole MoE module
    (router, experts, shared expert and its gate), a dense layer's projections."""
    block = spec.blocks(model)[layer]
    prefix = f"{spec.layers}.{layer}."
    if not is_moe_layer(spec, block):
        dense = dense_spec(spec)
        for role, module in dense.projections(block).items():
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if isinstance(tensor, Tensor):
                    yield dense.param_name(layer, role, kind), tensor
        return
    module_path = moe_spec(spec).block
    module = block.get_submodule(module_path)
    persistent = {n for n, _ in module.named_buffers() if _persistent(module, n)}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if isinstance(tensor, nn.Parameter) or name in persistent:
            yield f"{prefix}{module_path}.{name}", tensor


def _persistent(module: nn.Module, name: str) -> bool:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return attr not in owner._non_persistent_buffers_set


def layer_kind_problems(spec: ArchSpec, model: nn.Module, record: MoeRecord) -> list[str]:
    """Which layers the config makes MoE layers against the record's."""
    found = []
    for i, block in enumerate(spec.blocks(model)):
        if is_moe_layer(spec, block) != record.is_moe(i):
            kinds = ("a dense", "an MoE") if record.is_moe(i) else ("an MoE", "a dense")
            found.append(
                f"config.json: layer {i} is {kinds[0]} layer but {MANIFEST}'s moe record makes "
                f"it {kinds[1]} layer; re-export"
            )
    return found


def shape_problems(spec: ArchSpec, model: nn.Module, weights: ModuleReader) -> list[str]:
    """Every FF tensor of the export against the shape its config builds (``model`` on the
    meta device)."""
    found = []
    for layer in range(len(spec.blocks(model))):
        for name, tensor in ff_names(spec, model, layer):
            if name not in weights:
                behind = f" (or behind a conversion: {weights.unreadable[0]})"
                found.append(
                    f"{name}: missing from the weights{behind if weights.unreadable else ''}; "
                    "re-export"
                )
                continue
            try:
                shape = weights.shape(name)
            except ExportFormatError as exc:
                found.append(f"{exc}; re-export")
                continue
            if shape != tuple(tensor.shape):
                found.append(
                    f"{name}: shape {shape}, but config.json builds {tuple(tensor.shape)}; "
                    "re-export"
                )
    return found


# -- against the original -----------------------------------------------------------------------


def fingerprint_entries(
    spec: ArchSpec, record: MoeRecord, n_layers: int, weights: ModuleReader
) -> Iterator[str]:
    """The parameter names :func:`~griffin_export.core.moe.identity_tensors` fingerprints
    (routers, shared experts, dense layers), for the layers the record describes."""
    moe = moe_spec(spec)
    dense, shared = dense_spec(spec), shared_spec(spec)
    for layer in range(n_layers):
        if not record.is_moe(layer):
            specs = [dense]
        else:
            parts = (spec.layers, str(layer), moe.block, moe.router, moe.router_tensors[0][0])
            yield ".".join(p for p in parts if p)
            specs = [shared] if shared is not None and record.sizes.shared is not None else []
        for one in specs:
            for role in one.roles():
                for kind in ("weight", "bias"):
                    name = one.param_name(layer, role, kind)
                    if name in weights:
                        yield name


@dataclass
class OriginalCheck:
    """What comparing an MoE export with its original needs."""

    spec: ArchSpec
    model: nn.Module  # the export's config on the meta device
    exported: ModuleReader
    original: ModuleReader
    dtype: torch.dtype
    compensation: dict[str, Any] | None
    problems: list[str]
    #: parameter names compared here (the rest is compared whole when compensated)
    covered: set[str] = field(default_factory=set)

    def run(self, kept: list[KeptLayer]) -> None:
        """Compare every layer, then what else an MoE module holds (a shared expert's gate)
        whole."""
        for layer, choice in enumerate(kept):
            if isinstance(choice, Tensor):
                self._dense(dense_spec(self.spec), layer, choice, "dense FF")
            else:
                self._experts(layer, choice)
                self._router(layer, choice.experts)
                shared = shared_spec(self.spec)
                if shared is not None and choice.shared is not None:
                    self._dense(shared, layer, choice.shared, "shared expert")
        for layer in range(len(kept)):
            for name, _ in ff_names(self.spec, self.model, layer):
                if name not in self.covered:
                    self._whole(name)

    def _refitted(self, bias: bool) -> bool:
        """Whether a down weight (or, ``bias``, a down bias) was refitted on the prompt."""
        how = self.compensation
        return bool(how) and (not bias or bool(how and how.get("bias")))

    def _compare(self, got: Tensor, want: Tensor, what: str, refit: bool) -> None:
        want = want.to(self.dtype) if want.is_floating_point() else want
        if got.shape != want.shape or got.dtype != want.dtype:
            self.problems.append(
                f"{what}: shape {tuple(got.shape)} {got.dtype} where the original gives "
                f"{tuple(want.shape)} {want.dtype}; re-export"
            )
        elif refit:
            # Refitted on the prompt (griffin_export.core.compensation): its values are not
            # the original's; finiteness is still checkable.
            if not bool(torch.isfinite(got).all()):
                self.problems.append(f"{what}: refitted values are not finite; re-export")
        elif not torch.equal(got, want):
            self.problems.append(
                f"{what}: differs from the original's at the recorded indices (modified after "
                "export?); re-export"
            )

    def _experts(self, layer: int, choice: MoeLayerKeep) -> None:
        experts = experts_of(self.spec, self.spec.blocks(self.model)[layer])
        layout = ExpertsLayout.of(experts)
        prefix = _module_prefix(self.model, experts)
        names = [n for n, _ in experts.named_parameters(recurse=False)]
        for name in names:
            self.covered.add(prefix + name)
            if prefix + name not in self.original:
                self.problems.append(f"{prefix + name}: not in the original; pass the original")
                return
        for slot, (expert, neurons) in enumerate(
            zip(choice.experts.tolist(), choice.neurons, strict=True)
        ):
            full = {n: self.original.expert(prefix + n, expert) for n in names}
            want = slice_expert_tensors(_one_expert(layout, full), torch.tensor([0]), neurons[None])
            for name in names:
                got = self.exported.expert(prefix + name, slot)
                down = name.startswith("down_proj")
                self._compare(
                    got,
                    want[name][0],
                    f"layer {layer} expert {expert} (kept as {slot}): {name}",
                    down and self._refitted(name.endswith("_bias")),
                )

    def _router(self, layer: int, experts: Tensor) -> None:
        """The router's per-expert tensors (weight rows, biases, selection biases) and those
        the MoE module holds itself, each the original's at the kept experts."""
        block = self.spec.blocks(self.model)[layer]
        moe = moe_spec(self.spec)
        router = _module_prefix(self.model, router_of(self.spec, block))
        module = _module_prefix(self.model, block.get_submodule(moe.block))
        owned = [(router, name, axis) for name, axis in moe.router_tensors]
        owned += [(module, name, axis) for name, axis in moe.block_tensors]
        for prefix, name, axis in owned:
            key = prefix + name
            self.covered.add(key)
            if key not in self.exported or key not in self.original:
                continue  # reported by the shape checks / not a tensor of this checkpoint
            want = self.original.get(key).index_select(axis, experts)
            self._compare(self.exported.get(key), want, f"layer {layer} router: {key}", False)

    def _dense(self, spec: ArchSpec, layer: int, keep: Tensor, what: str) -> None:
        for role in spec.roles():
            for kind in ("weight", "bias"):
                name = spec.param_name(layer, role, kind)
                if name not in self.original:
                    continue
                self.covered.add(name)
                if name not in self.exported:
                    continue  # reported by the shape checks
                width = self.original.shape(spec.param_name(layer, "down"))[
                    spec.neuron_axis("down")
                ]
                want = sliced_original(spec, self.original, name, role, kind, keep, width)
                refit = role == "down" and self._refitted(kind == "bias")
                self._compare(self.exported.get(name), want, f"layer {layer} {what}: {name}", refit)

    def _whole(self, name: str) -> None:
        self.covered.add(name)
        if name not in self.exported or name not in self.original:
            return
        self._compare(self.exported.get(name), self.original.get(name), name, False)


def sliced_original(
    spec: ArchSpec,
    tensors: SafetensorsReader | ModuleReader,
    key: str,
    role: str,
    kind: str,
    keep: Tensor,
    d_ff: int,
) -> Tensor:
    """The original's ``key`` sliced to the kept neurons (as :mod:`griffin_export.core.slicing`
    slices it), reading only the kept rows or the column range they span, not the tensor."""
    if kind == "bias" and role not in INPUT_ROLES:
        return tensors.get(key)  # a down bias is kept whole
    index = fused_indices(keep, d_ff) if role == "gate_up" else keep
    return tensors.select(key, index, 0 if kind == "bias" else spec.neuron_axis(role))


def _module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}."
    raise UnsupportedArchitectureError("a module of the meta model is not in it")


def _one_expert(layout: ExpertsLayout, slabs: dict[str, Tensor]) -> nn.Module:
    """A stand-in experts module holding one expert's slabs (``[1, ...]``), with ``layout``'s
    flags, so :func:`~griffin_export.core.moe.slice_expert_tensors` slices it."""
    module = nn.Module()
    for name, slab in slabs.items():
        setattr(module, name, slab[None])
    flags = {
        "has_gate": layout.has_gate,
        "is_transposed": layout.transposed,
        "is_concatenated": layout.concatenated,
        "has_bias": layout.has_bias,
    }
    for name, value in flags.items():
        object.__setattr__(module, name, value)
    return module


def _ranges(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (f" and {len(values) - 8} more" if len(values) > 8 else "")
