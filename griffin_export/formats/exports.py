"""Opening griffin exports for use: checked against their manifest before anything loads, and
their originals found and checked against the recorded fingerprint."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.core.slicing import _sync_shape_attributes
from griffin_export.errors import ExportFormatError, ModelLoadError
from griffin_export.formats.layout import export_config, load_pretrained, require_export_dir
from griffin_export.formats.manifest import (
    is_export as is_export,  # re-exported: callers open exports from here
)
from griffin_export.formats.verify import check_export_files, check_original_model
from griffin_export.storage.loading import (
    LoadedModel,
    load_generation_config,
    load_model,
    load_tokenizer,
    parse_dtype,
)
from griffin_export.storage.safetensors_io import SafetensorsReader
from griffin_export.storage.sources import SourceRef, resolve_source


@dataclass
class OpenedExport:
    directory: Path
    manifest: dict[str, Any]
    loaded: LoadedModel

    @property
    def spec(self) -> ArchSpec:
        return self.loaded.spec


def open_export(export_dir: str | Path, device: str = "cpu") -> OpenedExport:
    """Load an export after checking every file against its manifest (a missing shard or a
    modified tensor is refused with the reason). Exports with per-layer FF sizes (a budget
    other than uniform) load through :func:`~griffin_export.formats.layout.load_pretrained`."""
    directory = require_export_dir(export_dir)
    return _load_export(directory, check_export_files(directory), device)


def _load_export(directory: Path, manifest: dict[str, Any], device: str) -> OpenedExport:
    source = SourceRef(str(directory), "directory", directory, str(directory))
    dtype = parse_dtype(manifest.get("dtype"))
    if len(set(manifest["k_per_layer"])) == 1 and manifest.get("checkpoint_format") != "decilm":
        loaded = load_model(source, dtype, device)
    else:
        model_type = manifest["source"]["model_type"]
        model = load_pretrained(directory, dtype=dtype, device=device)
        _, warnings = load_generation_config(directory)
        loaded = LoadedModel(
            model,
            load_tokenizer(source),
            spec_for(model_type),
            model_type,
            source,
            warnings=warnings,
        )
    return OpenedExport(directory, manifest, loaded)


def original_source(manifest: dict[str, Any], original: str | None = None) -> SourceRef:
    """Where an export's original is: ``original`` if given, else what the manifest recorded
    (the source directory, or the model name/id)."""
    if original is not None:
        return resolve_source(original)
    source = manifest.get("source", {})
    directory = source.get("directory")
    if directory and Path(directory).is_dir():
        return resolve_source(directory)
    name = source.get("model")
    if not name:
        raise ModelLoadError("the export's manifest names no source model; pass --original")
    try:
        return resolve_source(str(name))
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"the export's original '{name}' is not available here ({exc}); pass --original"
        ) from exc


def load_original(
    directory: Path, manifest: dict[str, Any], original: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """The full model the export in ``directory`` was made from, in the export's dtype,
    checked against the manifest's fingerprint (a different model is refused)."""
    source = original_source(manifest, original)
    loaded = load_model(source, parse_dtype(manifest.get("dtype")), device)
    check_original_model(directory, loaded.model)
    return loaded


def open_export_with_original(
    export_dir: str | Path, original: str | None = None, device: str = "cpu"
) -> tuple[OpenedExport, LoadedModel]:
    """An export and its original, holding the original once: the export's model shares
    every tensor that is byte for byte the original's (embeddings, attention, norms), and
    only its FF tensors are read from its own files. A mixture of experts' export is loaded
    whole beside its original.

    The export's files are checked against its manifest and the original against the
    recorded fingerprint first, as :func:`open_export` and :func:`load_original` do; a
    non-FF tensor of the export that differs from the original's is read from the export.
    """

    directory = require_export_dir(export_dir)
    manifest = check_export_files(directory)
    if manifest.get("moe") is not None:
        # transformers fuses routed experts in memory and writes them back per expert, so
        # the export's tensors are not the model's by name: it loads on its own, as stock
        # from_pretrained does
        opened = _load_export(directory, manifest, device)
        return opened, load_original(directory, manifest, original, device)
    source = SourceRef(str(directory), "directory", directory, str(directory))
    full = load_original(directory, manifest, original, device)
    spec = full.spec
    with SafetensorsReader.open(directory) as reader:
        ff_keys = {
            spec.param_name(layer, role, kind)
            for layer in range(len(spec.blocks(full.model)))
            for role in spec.roles()
            for kind in ("weight", "bias")
        }
        own: dict[int, Tensor] = {}  # id of an original tensor -> its placeholder in the copy
        for name, tensor in [*full.model.named_parameters(), *full.model.named_buffers()]:
            if name in ff_keys or (name in reader and not _same_bytes(reader, name, tensor)):
                own[id(tensor)] = nn.Parameter(torch.empty(0, dtype=tensor.dtype), False)
        memo: dict[int, Any] = {id(t): t for t in _all_tensors(full.model) if id(t) not in own}
        memo.update(own)
        model = copy.deepcopy(full.model, memo)
        model.config = export_config(directory)
        for prefix, module in model.named_modules():
            for attr, current in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]:
                if current.numel() or not any(current is p for p in own.values()):
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                if name not in reader:
                    raise ExportFormatError(
                        f"'{directory}' has no tensor '{name}'; re-run griffin export"
                    )
                value = reader.get(name).to(device=device, dtype=current.dtype)
                setattr(module, attr, nn.Parameter(value, requires_grad=False))
    for block in spec.blocks(model):
        for module in spec.projections(block).values():
            _sync_shape_attributes(module)
    model.eval()
    loaded = LoadedModel(model, load_tokenizer(source), spec, full.model_type, source)
    return OpenedExport(directory, manifest, loaded), full


def _all_tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def _same_bytes(reader: Any, key: str, tensor: Tensor) -> bool:
    """Whether checkpoint tensor ``key`` holds exactly ``tensor``'s bytes (read in chunks)."""
    if reader.dtype(key) != tensor.dtype or tuple(reader.shape(key)) != tuple(tensor.shape):
        return False
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    done = 0
    for piece in reader.chunks(key).read():
        n = len(piece)
        if not torch.equal(flat[done : done + n], torch.frombuffer(piece, dtype=torch.uint8)):
            return False
        done += n
    return done == flat.numel()
