"""What ``griffin inspect`` shows: the per-layer budget of an export, and the flocking pattern
(normalised FF activations, tokens x neurons) of one layer of a model on a prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.architectures import INPUT_ROLES, spec_for
from griffin_export.core.scoring import griffin_statistic
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.layout import export_shards
from griffin_export.formats.manifest import MANIFEST, read_manifest
from griffin_export.storage.loading import load_model, require_tokenizer
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


@dataclass(frozen=True)
class ExportSummary:
    directory: Path
    model: str
    model_type: str
    ratio: float
    budget: str
    rows: list[LayerRow]

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
    shrinking = {
        spec.param_name(layer, role, kind): layer
        for layer in range(len(ks))
        for role in spec.roles()
        for kind in ("weight", "bias")
        if kind == "weight" or role in INPUT_ROLES
    }
    per_neuron = [0] * len(ks)  # bytes of one kept neuron, per layer
    with SafetensorsReader(export_shards(directory)) as tensors:
        for key in tensors.keys():  # noqa: SIM118 (not a mapping)
            layer = shrinking.get(key)
            if layer is None:
                continue
            numel = math.prod(tensors.shape(key))
            dtype = SAFETENSORS_DTYPES.get(tensors.dtype_code(key))
            if dtype is None:
                raise ExportFormatError(
                    f"'{directory}' holds {key} as {tensors.dtype_code(key)}, a dtype griffin "
                    f"does not write; re-run griffin export (see {MANIFEST})"
                )
            per_neuron[layer] += numel * dtype.itemsize // max(int(ks[layer]), 1)
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
    )


@dataclass(frozen=True)
class Flocking:
    """``values`` ``[T, d_ff]``: ``|z_t| / ||z_t||`` of one layer's down-projection inputs, and
    ``order``: neurons by GRIFFIN statistic, largest first."""

    layer: int
    values: Tensor
    order: Tensor
    tokens: list[str]


@torch.inference_mode()
def flocking_from(model: str, prompt_text: str, layer: int, max_tokens: int = 256) -> Flocking:
    """:func:`flocking` of ``model`` (anything ``griffin export --model`` takes, loaded on the
    CPU with its tokenizer) over ``prompt_text``; ``max_tokens`` must be at least 1 (checked
    before the model loads)."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    loaded = load_model(resolve_source(model), None, "cpu")
    tokenizer = require_tokenizer(loaded.tokenizer, model)
    return flocking(loaded.model, tokenizer, prompt_text, layer, max_tokens)


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
