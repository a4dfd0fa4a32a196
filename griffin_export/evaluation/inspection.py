"""What ``griffin inspect`` shows: the per-layer budget of an export, and the flocking pattern
(normalised FF activations, tokens x neurons) of one layer of a model on a prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.architectures import INPUT_ROLES, ArchSpec, spec_for
from griffin_export.core.moe import dense_spec, moe_spec, shared_spec
from griffin_export.core.moe_selection import MoeLayerChoice, plan_moe_sizes, select_moe
from griffin_export.core.scoring import griffin_statistic
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.layout import export_shards
from griffin_export.formats.manifest import MANIFEST, read_manifest
from griffin_export.formats.verify_moe import ModuleReader
from griffin_export.storage.loading import load_model, read_model_type, require_tokenizer
from griffin_export.storage.safetensors_io import SAFETENSORS_DTYPES, SafetensorsReader
from griffin_export.storage.sources import resolve_source


@dataclass(frozen=True)
class LayerRow:
    """One layer of an export: neurons kept, of how many, and the FF bytes kept and saved."""

    layer: int
    k: int
    d_ff: int
    bytes_kept: int
    bytes_saved: int

    @property
    def fraction(self) -> float:
        return self.k / self.d_ff


#: marks of :meth:`MoeLayerRow.marks`: a kept expert the prompt routed to, a kept expert
#: filled in without routed tokens, a removed expert
KEPT_MARK, FILLED_MARK, DROPPED_MARK = "■", "□", "·"


@dataclass(frozen=True)
class MoeLayerRow:
    """One MoE layer of an export, from the manifest's ``moe`` record: the routed experts
    kept (original indices) of ``total``, the share of the prompt's routing weight they
    carried, those filled in without routed tokens, and how many were refitted."""

    layer: int
    experts: list[int]
    total: int
    mass_kept: float
    filled: list[int]
    refit: int

    def marks(self, group: int = 8) -> str:
        """One mark per routed expert of the original, in index order (:data:`KEPT_MARK`,
        :data:`FILLED_MARK`, :data:`DROPPED_MARK`), a space after every ``group``."""
        kept, filled = set(self.experts), set(self.filled)
        marks = [
            (FILLED_MARK if e in filled else KEPT_MARK) if e in kept else DROPPED_MARK
            for e in range(self.total)
        ]
        return " ".join("".join(marks[i : i + group]) for i in range(0, self.total, group))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "experts": list(self.experts),
            "experts_total": self.total,
            "mass_kept": self.mass_kept,
            "filled": list(self.filled),
            "refit": self.refit,
            "marks": self.marks(group=self.total),
        }


@dataclass(frozen=True)
class MoeSummary:
    """The manifest's ``moe`` record as :class:`MoeLayerRow` per MoE layer."""

    sizes: dict[str, int | None]
    expert_score: str
    layers: list[MoeLayerRow]

    def row(self, layer: int) -> MoeLayerRow | None:
        return next((r for r in self.layers if r.layer == layer), None)

    @property
    def mass_kept(self) -> float:
        """The mean share of routing weight kept over the MoE layers."""
        return sum(r.mass_kept for r in self.layers) / max(len(self.layers), 1)


def moe_summary(record: dict[str, Any]) -> MoeSummary:
    """:class:`MoeSummary` of a manifest's ``moe`` record (``ExportFormatError`` when a
    layer entry lacks a field griffin writes)."""
    sizes = dict(record["sizes"])
    total = sizes.get("experts_total")
    rows = []
    for entry in record["layers"]:
        try:
            rows.append(
                MoeLayerRow(
                    layer=int(entry["layer"]),
                    experts=[int(e) for e in entry["experts"]],
                    total=int(total),  # type: ignore[arg-type]
                    mass_kept=float(entry.get("mass_kept", 0.0)),
                    filled=[int(e) for e in entry.get("filled", [])],
                    refit=int(entry.get("refit", 0)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportFormatError(
                f"{MANIFEST}: the moe record's layer entry {entry!r} is malformed ({exc}); "
                "re-export"
            ) from exc
    return MoeSummary(sizes, str(record.get("expert_score", "")), rows)


@dataclass(frozen=True)
class ExportSummary:
    directory: Path
    model: str
    model_type: str
    ratio: float
    budget: str
    rows: list[LayerRow]
    #: a mixture of experts' record, ``None`` for a dense export
    moe: MoeSummary | None = None

    @property
    def bytes_saved(self) -> int:
        return sum(r.bytes_saved for r in self.rows)

    @property
    def kept_fraction(self) -> float:
        return sum(r.k for r in self.rows) / sum(r.d_ff for r in self.rows)


def summarize_export(export_dir: str | Path) -> ExportSummary:
    """Per-layer ``k``, kept fraction and FF bytes kept/saved of an export, from its manifest
    and its safetensors headers (no tensor data is read)."""
    directory = Path(export_dir)
    manifest = read_manifest(directory)  # validated: k_per_layer and source.d_ff are sound
    source = manifest.source
    d_ff = source.d_ff
    ks = manifest.k_per_layer
    spec = spec_for(source.model_type)
    # The FF tensors that shrink with k (down's bias does not), by layer.
    shrinking = {name: layer for layer in range(len(ks)) for name in _shrinking(spec, layer)}
    moe = None if manifest.moe is None else moe_summary(manifest.moe)
    with SafetensorsReader(export_shards(directory)) as tensors:
        if moe is not None:
            rows = _moe_rows(spec, source.model_type, tensors, moe, ks, directory)
        else:
            per_neuron = [0] * len(ks)  # bytes of one kept neuron, per layer
            for key in tensors.keys():  # noqa: SIM118 (not a mapping)
                layer = shrinking.get(key)
                if layer is not None:
                    per_neuron[layer] += _nbytes(tensors, key, directory) // max(int(ks[layer]), 1)
            rows = [
                LayerRow(i, int(k), d_ff, per_neuron[i] * int(k), per_neuron[i] * (d_ff - int(k)))
                for i, k in enumerate(ks)
            ]
    return ExportSummary(
        directory=directory,
        model=source.model,
        model_type=source.model_type,
        ratio=manifest.ratio,
        budget=manifest.budget,
        rows=rows,
        moe=moe,
    )


def _nbytes(tensors: SafetensorsReader, key: str, directory: Path) -> int:
    dtype = SAFETENSORS_DTYPES.get(tensors.dtype_code(key))
    if dtype is None:
        raise ExportFormatError(
            f"'{directory}' holds {key} as {tensors.dtype_code(key)}, a dtype griffin "
            f"does not write; re-run griffin export (see {MANIFEST})"
        )
    return math.prod(tensors.shape(key)) * dtype.itemsize


def _moe_rows(
    spec: ArchSpec,
    model_type: str,
    tensors: SafetensorsReader,
    moe: MoeSummary,
    ks: list[int],
    directory: Path,
) -> list[LayerRow]:
    """:class:`LayerRow` per layer of an MoE export, counting every FF neuron of a layer:
    an MoE layer keeps ``E' * I'`` routed-expert neurons of ``E * I`` (plus its shared
    expert's), a dense layer ``k`` of its width. Bytes are those of the tensors that shrink
    with the neurons kept (the routed experts' down bias and the router rows are left out)."""
    sizes = moe.sizes
    weights = ModuleReader(tensors, model_type)
    shared, dense = shared_spec(spec), dense_spec(spec)
    block = moe_spec(spec).block
    experts_path = moe_spec(spec).experts
    rows = []
    for layer, k in enumerate(ks):
        parts: list[tuple[list[str], int, int]] = []  # (tensor names, kept, total) per FF
        if moe.row(layer) is None:
            parts.append((_shrinking(dense, layer), int(k), int(sizes["dense_total"] or k)))
        else:
            prefix = f"{spec.layers}.{layer}.{block}.{experts_path}."
            names = [
                n
                for n in weights.names()
                if n.startswith(prefix) and not n.endswith("down_proj_bias")
            ]
            experts, total = int(sizes["experts"] or 0), int(sizes["experts_total"] or 0)
            width, width_total = int(sizes["width"] or 0), int(sizes["width_total"] or 0)
            parts.append((names, experts * width, total * width_total))
            if shared is not None and sizes.get("shared") is not None:
                kept, full = int(sizes["shared"] or 0), int(sizes["shared_total"] or 0)
                parts.append((_shrinking(shared, layer), kept, full))
        kept_bytes = saved = 0
        for names, kept, full in parts:
            size = sum(
                _nbytes(tensors, key, Path("."))
                for n in names
                for key in weights.checkpoint_keys(n)
            )
            per_unit = size // max(kept, 1)
            kept_bytes += per_unit * kept
            saved += per_unit * (full - kept)
        rows.append(
            LayerRow(
                layer,
                sum(p[1] for p in parts),
                sum(p[2] for p in parts),
                kept_bytes,
                saved,
            )
        )
    return rows


def _shrinking(spec: ArchSpec, layer: int) -> list[str]:
    """The FF tensor names of ``layer`` that shrink with its kept neurons."""
    return [
        spec.param_name(layer, role, kind)
        for role in spec.roles()
        for kind in ("weight", "bias")
        if kind == "weight" or role in INPUT_ROLES
    ]


@dataclass(frozen=True)
class Flocking:
    """``values`` ``[T, d_ff]``: ``|z_t| / ||z_t||`` of one layer's down-projection inputs, and
    ``order``: neurons by GRIFFIN statistic, largest first."""

    layer: int
    values: Tensor
    order: Tensor
    tokens: list[str]


@dataclass(frozen=True)
class Routing:
    """How a prompt routes through a mixture of experts: per MoE layer (``layers``), the
    routing weight summed over the prompt's tokens routed to each expert (``mass`` ``[L, E]``)
    and the number of those tokens (``tokens`` ``[L, E]``), over ``n_tokens`` tokens."""

    layers: list[int]
    mass: Tensor
    tokens: Tensor
    n_tokens: int

    @property
    def share(self) -> Tensor:
        """``mass`` as each layer's share of its routing weight (rows sum to 1)."""
        return self.mass / self.mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)


#: shades of :func:`shade`, from no routing weight to a layer's largest
SHADES = " ░▒▓█"


def shade(share: Tensor, group: int = 8) -> str:
    """One character per expert, darker the more routing weight it carried (relative to the
    layer's largest; blank: none), a space after every ``group``."""
    top = float(share.max()) if share.numel() else 0.0
    levels = len(SHADES) - 1
    marks = [
        SHADES[0] if v <= 0 or top <= 0 else SHADES[max(1, round(levels * v / top))]
        for v in share.tolist()
    ]
    return " ".join("".join(marks[i : i + group]) for i in range(0, len(marks), group))


def is_moe_model(model: str) -> bool:
    """Whether ``model`` (anything ``griffin export --model`` takes) is a mixture of experts,
    from its config alone."""
    return spec_for(read_model_type(resolve_source(model))).moe is not None


@torch.inference_mode()
def flocking_from(
    model: str, prompt_text: str, layer: int, max_tokens: int = 256
) -> Flocking | Routing:
    """:func:`flocking` of ``model`` (anything ``griffin export --model`` takes, loaded on the
    CPU with its tokenizer) over ``prompt_text``; of a mixture of experts, its
    :func:`routing` instead. ``max_tokens`` must be at least 1 (checked before the model
    loads)."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    loaded = load_model(resolve_source(model), None, "cpu")
    tokenizer = require_tokenizer(loaded.tokenizer, model)
    if loaded.spec.moe is not None:
        return routing(loaded.model, tokenizer, prompt_text, max_tokens)
    return flocking(loaded.model, tokenizer, prompt_text, layer, max_tokens)


def routing(model: torch.nn.Module, tokenizer: object, text: str, max_tokens: int = 256) -> Routing:
    """Where the first ``max_tokens`` tokens of ``text`` are routed in every MoE layer of
    ``model``: export's own statistics (:func:`~griffin_export.core.moe_selection.select_moe`
    keeping every expert), run layer-major."""
    spec = spec_for(str(getattr(getattr(model, "config", None), "model_type", "")))
    ids = torch.tensor(tokenizer(text)["input_ids"][:max_tokens], dtype=torch.long)  # type: ignore[operator]
    if ids.numel() == 0:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt")
    sizes = plan_moe_sizes(spec, model, 1.0, 1.0)
    chosen = select_moe(spec, model, [ids.reshape(1, -1)], sizes)
    layers = [
        (i, choice) for i, choice in enumerate(chosen.layers) if isinstance(choice, MoeLayerChoice)
    ]
    return Routing(
        layers=[i for i, _ in layers],
        mass=torch.stack([c.mass.float() for _, c in layers]),
        tokens=torch.stack([c.tokens for _, c in layers]),
        n_tokens=int(ids.numel()),
    )


def flocking(
    model: torch.nn.Module, tokenizer: object, text: str, layer: int, max_tokens: int = 256
) -> Flocking:
    """Normalised activations of ``layer``'s FF neurons over the first ``max_tokens`` tokens
    of ``text`` (the picture of GRIFFIN's "flocking": the same neurons light up across
    tokens)."""
    spec = spec_for(str(getattr(getattr(model, "config", None), "model_type", "")))
    n_layers = len(spec.blocks(model))
    if not -n_layers <= layer < n_layers:
        raise UsageError(f"--layer {layer} is outside 0..{n_layers - 1}; pick an existing layer")
    layer %= n_layers
    ids = torch.tensor(tokenizer(text)["input_ids"][:max_tokens], dtype=torch.long)  # type: ignore[operator]
    if ids.numel() == 0:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt")
    seen: list[Tensor] = []

    def sink(index: int, z: Tensor) -> None:
        if index == layer:
            seen.append(z[0].float().clone())

    device = next(model.parameters()).device
    with capture_down_inputs(spec, model, sink):
        model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    z = seen[0].cpu()  # [T, d_ff]
    unit = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-30)
    scores = griffin_statistic(z)
    order = torch.sort(scores, descending=True, stable=True).indices
    pieces = [tokenizer.decode([int(t)]) for t in ids]  # type: ignore[attr-defined]
    return Flocking(layer, unit.abs(), order, pieces)
