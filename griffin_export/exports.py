"""Opening griffin exports for use: checked against their manifest before anything loads, and
their originals found and checked against the recorded fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import ArchSpec, spec_for
from .checkpoint import (
    LoadedModel,
    SourceRef,
    load_model,
    load_tokenizer,
    parse_dtype,
    read_model_type,
    resolve_source,
)
from .errors import ModelLoadError
from .loader import load_pretrained
from .manifest import is_export as is_export  # re-exported: callers open exports from here
from .verify import check_export_files, check_original_model


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
    other than uniform) load through :func:`~griffin_export.loader.load_pretrained`."""
    directory = Path(export_dir)
    manifest = check_export_files(directory)
    source = SourceRef(str(directory), "directory", directory, str(directory))
    dtype = parse_dtype(manifest.get("dtype"))
    if len(set(manifest["k_per_layer"])) == 1:
        loaded = load_model(source, dtype, device)
    else:
        model_type = read_model_type(source)
        model = load_pretrained(directory, dtype=dtype, device=device)
        loaded = LoadedModel(
            model, load_tokenizer(source), spec_for(model_type), model_type, source
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
    export: OpenedExport, original: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """The full model an export was made from, in the export's dtype, checked against the
    manifest's fingerprint (a different model is refused)."""
    source = original_source(export.manifest, original)
    loaded = load_model(source, parse_dtype(export.manifest.get("dtype")), device)
    check_original_model(export.directory, loaded.model)
    return loaded
