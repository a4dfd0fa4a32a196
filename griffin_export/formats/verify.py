"""Check an export directory against its manifest, its config and (optionally) its original.

``verify_export`` collects every problem it finds as one line each (what, where, the fix);
``check_export_files`` and ``check_original`` are the guards that the runtime and ``griffin
ppl`` call before they trust an export. Tensors are read with ``safe_open`` (headers for
shapes, one tensor at a time for values); no model is built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.core.budgets import BUDGETS
from griffin_export.errors import (
    ExportFormatError,
    GriffinError,
    ModelLoadError,
    OriginalMismatchError,
    UnsupportedArchitectureError,
    VerificationError,
    first_line,
)
from griffin_export.formats.decilm import source_config
from griffin_export.formats.layout import export_config
from griffin_export.formats.manifest import (
    EXPERTS_FILE,
    FORMAT_NAME,
    MANIFEST,
    SIZES_KEY,
    is_int,
    manifest_problems,
)
from griffin_export.formats.verify_moe import (
    KeptLayer,
    ModuleReader,
    OriginalCheck,
    check_index_map,
    config_problems,
    fingerprint_entries,
    index_problems,
    layer_kind_problems,
    meta_model,
    read_record,
    shape_problems,
    sliced_original,
)
from griffin_export.storage.fingerprint import (
    ff_tensors,
    file_sha256,
    fingerprint_samples,
    sample_ranges,
    samples_as_float,
    samples_fingerprint,
)
from griffin_export.storage.jsonfile import read_json_object
from griffin_export.storage.loading import DTYPE_OPTIONS, check_safetensors_files
from griffin_export.storage.safetensors_io import INDEX_NAME, SafetensorsReader, list_shards
from griffin_export.storage.sources import resolve_source

#: Files that a loader would read: an unlisted one was added after the export was written.
_LOADABLE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".py", ".gguf")


@dataclass
class VerifyReport:
    """What ``verify_export`` checked and every problem it found (empty when all hold)."""

    export_dir: Path
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    original: str | None = None
    #: The manifest and kept-index map as read, once the weights were found readable (what a
    #: further check such as :mod:`griffin_export.build.reproduce` starts from).
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    keep: list[Tensor] | None = field(default=None, repr=False)
    #: of a mixture-of-experts export, the kept-index map per layer instead of ``keep``
    moe_keep: list[KeptLayer] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "export_dir": str(self.export_dir),
            "ok": self.ok,
            "problems": self.problems,
            "checked": self.checked,
            "original": self.original,
        }


def weight_files(directory: Path) -> tuple[list[Path], list[str]]:
    """The safetensors weight files of an HF directory and the problems finding them."""
    try:
        shards = list_shards(directory)
    except GriffinError:
        return [], [f"{INDEX_NAME}: unreadable or malformed; re-export"]
    problems = [
        f"{name}: weight shard listed in {INDEX_NAME} is missing; re-export"
        for name in shards.missing
    ]
    if not shards.files and not shards.missing:
        problems.append(
            "no model.safetensors or model.safetensors.index.json: weights missing; re-export"
        )
    return shards.files, problems


def verify_export(
    export_dir: str | Path,
    original: str | Path | None = None,
    *,
    hash_files: bool = True,
) -> VerifyReport:
    """Check an export directory; every finding becomes one line of ``report.problems``.

    Checks the manifest (``griffin.json``), the sha256 of every file it lists (and that no
    loadable file was added), the FF shapes against ``config.json``, and the kept-index map
    (per layer: sorted, unique, within ``d_ff``, ``k`` entries). With ``original`` (a local
    model directory or anything ``--model`` accepts that resolves to one), also that the
    original is the model the export was made from (FF fingerprint) and that every pruned
    tensor equals the original's sliced at the recorded indices.

    Recomputing the export from its prompt (``griffin verify --prompt``) needs the pipeline
    that wrote it: :func:`griffin_export.build.reproduce.verify_with_prompt`.

    Raises :class:`~griffin_export.errors.GriffinError` only when ``original`` itself cannot
    be found or read; problems of the export are reported, never raised.
    """
    export_dir = Path(export_dir)
    report = VerifyReport(export_dir, original=None if original is None else str(original))
    problems = report.problems
    if not export_dir.is_dir():
        problems.append(
            f"'{export_dir}' does not exist or is not a directory; pass the directory that "
            "griffin export wrote"
        )
        return report
    manifest = _check_manifest(export_dir, problems)
    if manifest is None:
        return report
    report.checked.append("manifest")
    if hash_files:
        _check_hashes(export_dir, manifest, problems)
        report.checked.append(f"sha256 of {len(manifest['files'])} files")
    layout = _check_config(export_dir, manifest, problems)
    if layout is None:
        return report
    spec, hidden = layout
    if manifest.get("moe") is not None:
        _verify_moe(report, spec, manifest, original)
        return report
    k_per_layer: list[int] = manifest["k_per_layer"]
    d_ff: int = manifest["source"]["d_ff"]
    keep = _check_experts(export_dir, k_per_layer, d_ff, problems)
    report.checked.append("kept-index map")
    with contextlib.ExitStack() as stack:
        files, found = weight_files(export_dir)
        problems.extend(found)
        try:
            exported = stack.enter_context(SafetensorsReader(files))
        except (SafetensorError, OSError) as exc:
            problems.append(f"weights unreadable ({first_line(exc)}); re-export")
            return report
        _check_shapes(spec, exported, k_per_layer, hidden, problems)
        report.checked.append("FF tensor shapes")
        if original is not None and keep is not None:
            _check_against_original(spec, manifest, exported, keep, str(original), stack, problems)
            report.checked.append("pruned tensors against the original")
        elif original is not None:
            problems.append(
                f"original '{original}': not compared, since the kept-index map is unusable "
                "(see above); re-export"
            )
        report.manifest, report.keep = manifest, keep
    return report


def check_export_files(export_dir: str | Path, *, hash_files: bool = True) -> dict[str, Any]:
    """Refuse an export that is incomplete or was modified; return its manifest.

    This is :func:`verify_export` without an original: the guard the runtime and ``griffin
    ppl`` call before loading an export. Raises
    :class:`~griffin_export.errors.VerificationError` (exit code 1) naming the first problem.
    """
    report = verify_export(export_dir, hash_files=hash_files)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise VerificationError(
            f"'{export_dir}' failed verification: {report.problems[0]}{more}; run "
            f"'griffin verify {export_dir}' for the full list",
            report.problems,
        )
    return read_json_object(Path(export_dir) / MANIFEST)


def check_original(export_dir: str | Path, original: str | Path) -> None:
    """Refuse an original that is not the model ``export_dir`` was made from.

    Compares the fingerprint of the original's FF tensors (read by checkpoint key from its
    safetensors, cast to the export's dtype) with the one in ``griffin.json``. Raises
    :class:`~griffin_export.errors.OriginalMismatchError`, or ``ModelLoadError`` when the
    original cannot be read.
    """
    manifest = _require_manifest(Path(export_dir))
    spec = spec_for(manifest["source"]["model_type"])
    directory = _original_directory(str(original))
    with contextlib.ExitStack() as stack:
        tensors = _open_original(directory, stack)
        found = original_fingerprint(spec, manifest, tensors)
    _compare_fingerprint(export_dir, original, manifest, found)


def check_original_model(export_dir: str | Path, model: nn.Module) -> None:
    """:func:`check_original` for an original already loaded as a model (any dtype that
    holds the export's values exactly, e.g. the export's own dtype)."""

    manifest = _require_manifest(Path(export_dir))
    spec = spec_for(manifest["source"]["model_type"])
    dtype = _torch_dtype(manifest["dtype"])
    found = samples_fingerprint(
        (key, tuple(tensor.shape), fingerprint_samples(tensor, dtype=dtype))
        for key, tensor in ff_tensors(spec, model)
    )
    _compare_fingerprint(export_dir, getattr(model, "name_or_path", "model"), manifest, found)


def original_fingerprint(
    spec: ArchSpec, manifest: dict[str, Any], tensors: SafetensorsReader
) -> str:
    """The export-time fingerprint recomputed from an original's safetensors: only the
    sampled elements of each FF tensor are read and cast to the export's dtype (as
    :func:`~griffin_export.storage.fingerprint.weights_fingerprint` of the cast tensors)."""
    dtype = _torch_dtype(manifest["dtype"])
    n_layers = len(manifest["k_per_layer"])
    weights: SafetensorsReader | ModuleReader = tensors
    keys: Iterator[str] | list[str] = _ff_keys(spec, n_layers, tensors)
    if manifest.get("moe") is not None:  # routers, shared experts, dense layers by model name
        weights = ModuleReader(tensors, manifest["source"]["model_type"])
        record = read_record(manifest, [])
        keys = [] if record is None else fingerprint_entries(spec, record, n_layers, weights)
    entries = []
    for key in keys:
        shape = weights.shape(key)
        parts = [weights.flat(key, a, b) for a, b in sample_ranges(math.prod(shape))]
        entries.append((key, shape, samples_as_float(parts, dtype)))
    return samples_fingerprint(entries)


# -- the checks ---------------------------------------------------------------------------------


def _check_manifest(export_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    path = export_dir / MANIFEST
    if not path.is_file():
        problems.append(
            f"{MANIFEST}: missing, so '{export_dir}' is not a griffin export (or its manifest "
            "was deleted); re-export it with griffin export"
        )
        return None
    try:
        manifest = read_json_object(path)
    except ValueError as exc:
        problems.append(f"{MANIFEST}: {exc}; re-export")
        return None
    found = manifest_problems(manifest)
    if found:
        problems.append(f"{MANIFEST}: {found[0]}")
        return None
    return manifest


def _check_hashes(export_dir: Path, manifest: dict[str, Any], problems: list[str]) -> None:
    listed: dict[str, str] = manifest["files"]
    for name, digest in sorted(listed.items()):
        path = export_dir / name
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{MANIFEST}: lists '{name}', which is not a file name; re-export")
        elif not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing; re-export")
        elif file_sha256(path) != digest:
            problems.append(
                f"{name}: sha256 differs from {MANIFEST} (modified or corrupted); re-export"
            )
    for path in sorted(export_dir.iterdir()):
        name = path.name
        if name == MANIFEST or name.startswith(".") or name in listed:
            continue
        if path.is_file() and name.endswith(_LOADABLE_SUFFIXES):
            problems.append(
                f"{name}: not listed in {MANIFEST} (added after the export); remove it or re-export"
            )


def _check_config(
    export_dir: Path, manifest: dict[str, Any], problems: list[str]
) -> tuple[ArchSpec, int | None] | None:
    path = export_dir / "config.json"
    try:
        raw = source_config(read_json_object(path))  # a DeciLM layout as its family's config
    except (ValueError, ExportFormatError) as exc:
        problems.append(f"config.json: {exc}; re-export")
        return None
    model_type = raw.get("model_type")
    expected_type = manifest["source"]["model_type"]
    if model_type != expected_type:
        problems.append(
            f"config.json: model_type {model_type!r} but {MANIFEST} says {expected_type!r}; "
            "re-export"
        )
        return None
    try:
        spec = spec_for(str(model_type))
    except GriffinError as exc:
        problems.append(f"config.json: {exc}")
        return None
    griffin_block = raw.get("griffin")
    if not isinstance(griffin_block, dict) or griffin_block.get("format") != FORMAT_NAME:
        problems.append("config.json: no griffin block (not written by griffin); re-export")
    ks: list[int] = manifest["k_per_layer"]
    config = SimpleNamespace(**raw)
    try:  # a mixture of experts' widths: verify_moe.config_problems
        width: int | None = spec.d_ff(config) if manifest.get("moe") is None else None
    except GriffinError as exc:
        problems.append(
            f"config.json: the FF width could not be read ({first_line(exc)}), so it was not "
            f"checked against the {MANIFEST}'s k; re-export"
        )
        width = None
    listed = griffin_block.get(SIZES_KEY) if isinstance(griffin_block, dict) else None
    if manifest.get("moe") is not None:
        pass  # one width per kind of FF, in the family's own keys (verify_moe.config_problems)
    elif listed is None and len(set(ks)) > 1:
        problems.append(
            f"config.json: no griffin.{SIZES_KEY} but {MANIFEST} keeps {ks} neurons per layer; "
            "re-export"
        )
    elif listed is not None and listed != ks:
        problems.append(
            f"config.json: griffin.{SIZES_KEY} is {listed!r} but {MANIFEST} keeps {ks} neurons "
            "per layer; re-export"
        )
    elif width is not None and width != max(ks):  # the largest layer's (all, when uniform)
        problems.append(
            f"config.json: {spec.size_key} is {getattr(config, spec.size_key, None)!r} but "
            f"{MANIFEST} keeps {sorted(set(ks))} neurons per layer; re-export"
        )
    budget = manifest.get("budget", "uniform")
    if budget not in BUDGETS:
        problems.append(
            f"{MANIFEST}: budget {budget!r} is not one of {', '.join(BUDGETS)}; re-export"
        )
    n_layers, hidden = _config_sizes(export_dir, problems)
    if n_layers is not None and n_layers != len(ks):
        problems.append(
            f"config.json: {n_layers} layers but {MANIFEST} has k for {len(ks)}; re-export"
        )
    return spec, hidden


def _config_sizes(directory: Path, problems: list[str]) -> tuple[int | None, int | None]:
    """(number of layers, hidden size) through transformers' attribute maps (no weights).

    Either size that cannot be read is a problem (the checks that need it did not run), never
    a silent ``None``; the FF shapes' other axis is then taken from the tensors as they are."""
    try:
        config = export_config(directory)
    except Exception as exc:  # transformers' config classes raise many types (validation...)
        problems.append(
            f"config.json: transformers cannot read it ({type(exc).__name__}: "
            f"{first_line(exc)}), so the layer count and hidden size were not checked; fix "
            "config.json or re-export"
        )
        return None, None
    sizes: list[int | None] = []
    for name, check in (
        ("num_hidden_layers", f"the layer count against {MANIFEST}"),
        ("hidden_size", "the FF tensors' hidden dimension"),
    ):
        value = getattr(config, name, None)
        if not is_int(value):
            problems.append(
                f"config.json: {name} is {value!r}, not an integer, so {check} was not checked; "
                "re-export"
            )
            value = None
        sizes.append(value)
    return sizes[0], sizes[1]


def _read_index_map(export_dir: Path, d_ff: int, problems: list[str]) -> dict[str, Tensor] | None:
    """The kept-index map's tensors, checked for readability and its ``d_ff`` metadata."""
    path = export_dir / EXPERTS_FILE
    if not path.is_file():
        problems.append(f"{EXPERTS_FILE}: missing (the kept-index map); re-export")
        return None
    try:
        with SafetensorsReader([path]) as handle:
            metadata = handle.metadata(path)
            tensors = {key: handle.get(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        problems.append(f"{EXPERTS_FILE}: unreadable ({first_line(exc)}); re-export")
        return None
    if metadata.get("d_ff") not in (None, str(d_ff)):
        problems.append(
            f"{EXPERTS_FILE}: metadata d_ff {metadata.get('d_ff')} but {MANIFEST} says {d_ff}; "
            "re-export"
        )
    return tensors


def _check_experts(
    export_dir: Path, k_per_layer: list[int], d_ff: int, problems: list[str]
) -> list[Tensor] | None:
    """Validate the kept-index map; returns the per-layer indices (int64) when usable."""
    tensors = _read_index_map(export_dir, d_ff, problems)
    if tensors is None:
        return None
    expected = {f"layer.{i}" for i in range(len(k_per_layer))}
    for extra in sorted(set(tensors) - expected):
        problems.append(f"{EXPERTS_FILE}: unexpected entry '{extra}'; re-export")
    keep: list[Tensor] = []
    usable = True
    for i, k in enumerate(k_per_layer):
        name = f"layer.{i}"
        where = f"{EXPERTS_FILE} {name}"
        index = tensors.get(name)
        if index is None:
            problems.append(f"{where}: missing; re-export")
            usable = False
            continue
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            problems.append(
                f"{where}: expected a 1-D integer tensor, found {index.dtype!s} of shape "
                f"{tuple(index.shape)}; re-export"
            )
            usable = False
            continue
        index = index.long()
        found = index_problems(index, k, d_ff)
        if found:
            problems.append(f"{where}: {'; '.join(found)}; re-export")
            usable = False
        keep.append(index)
    return keep if usable else None


def _check_shapes(
    spec: ArchSpec,
    tensors: SafetensorsReader,
    k_per_layer: list[int],
    hidden: int | None,
    problems: list[str],
) -> None:
    for layer, k in enumerate(k_per_layer):
        for role in spec.roles():
            for kind in ("weight", "bias"):
                key = spec.param_name(layer, role, kind)
                if key not in tensors:
                    if kind == "weight":
                        problems.append(f"{key}: missing from the weights; re-export")
                    continue
                shape = tensors.shape(key)
                wanted = _expected_shape(spec, role, kind, k, hidden, shape)
                if shape != wanted:
                    problems.append(f"{key}: shape {shape}, expected {wanted} for k={k}; re-export")


def _expected_shape(
    spec: ArchSpec,
    role: str,
    kind: str,
    k: int,
    hidden: int | None,
    shape: tuple[int, ...],
) -> tuple[int | None, ...]:
    """The shape an FF tensor must have after pruning to ``k`` (``hidden`` if unknown: as is)."""
    neurons = 2 * k if role == "gate_up" else k
    is_input = role != "down"
    if kind == "bias":
        return (neurons,) if is_input else (hidden if hidden is not None else shape[0],)
    axis = spec.neuron_axis(role)
    other = hidden if hidden is not None else (shape[1 - axis] if len(shape) == 2 else None)
    dims: list[int | None] = [other, other]
    dims[axis] = neurons
    return tuple(dims)


def _check_against_original(
    spec: ArchSpec,
    manifest: dict[str, Any],
    exported: SafetensorsReader,
    keep: list[Tensor],
    original: str,
    stack: contextlib.ExitStack,
    problems: list[str],
) -> None:
    tensors = _open_same_original(spec, manifest, original, stack, problems)
    if tensors is None:
        return
    source = manifest["source"]
    dtype = _torch_dtype(manifest["dtype"])
    d_ff = int(source["d_ff"])
    compensation = manifest.get("compensation") or {}
    ff_keys: set[str] = set()
    for layer, index in enumerate(keep):
        for role in spec.roles():
            for kind in ("weight", "bias"):
                key = spec.param_name(layer, role, kind)
                ff_keys.add(key)
                if key not in tensors:
                    if key in exported:
                        problems.append(f"{key}: in the export but not in the original")
                    continue
                if key not in exported:
                    if kind == "bias":  # a missing weight is already reported
                        problems.append(f"{key}: in the original but missing from the export")
                    continue
                want = sliced_original(spec, tensors, key, role, kind, index, d_ff).to(dtype)
                got = exported.get(key)
                if role == "down" and (kind == "weight" or compensation.get("bias")):
                    # Refitted on the prompt (griffin_export.core.compensation): its values are
                    # not the original's; shape, dtype and finiteness still are checkable.
                    if got.shape != want.shape or got.dtype != want.dtype:
                        problems.append(
                            f"{key}: shape {tuple(got.shape)} {got.dtype} where the refit "
                            f"writes {tuple(want.shape)} {want.dtype}; re-export"
                        )
                    elif not bool(torch.isfinite(got).all()):
                        problems.append(f"{key}: refitted values are not finite; re-export")
                    continue
                if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
                    problems.append(
                        f"{key}: differs from the original sliced at the recorded indices "
                        "(modified after export?); re-export"
                    )
    if compensation:
        _check_untouched(exported, tensors, ff_keys, dtype, problems)


def _open_same_original(
    spec: ArchSpec,
    manifest: dict[str, Any],
    original: str,
    stack: contextlib.ExitStack,
    problems: list[str],
) -> SafetensorsReader | None:
    """The original's weights, once it is known to be the model the export was made from
    (family and fingerprint); ``None`` with the problem otherwise."""
    directory = _original_directory(original)
    tensors = _open_original(directory, stack)
    source = manifest["source"]
    try:
        model_type = read_json_object(directory / "config.json").get("model_type")
    except ValueError as exc:
        problems.append(
            f"original '{original}': config.json {exc}, so its family could not be compared "
            f"with the export's; pass the original it was exported from ({source.get('model')})"
        )
        return None
    if model_type != source["model_type"]:
        problems.append(
            f"original '{original}' is a {model_type!r} model but the export was made from a "
            f"{source['model_type']!r}; pass the original it was exported from "
            f"({source.get('model')})"
        )
        return None
    if original_fingerprint(spec, manifest, tensors) != source["fingerprint"]:
        problems.append(
            f"original '{original}' is not the model the export was made from (its FF weights "
            f"differ from the fingerprint in {MANIFEST}); pass the original it was exported "
            f"from ({source.get('model')})"
        )
        return None
    return tensors


def _verify_moe(
    report: VerifyReport, spec: ArchSpec, manifest: dict[str, Any], original: str | Path | None
) -> None:
    """The checks of a mixture-of-experts export (:mod:`griffin_export.formats.verify_moe`):
    the moe record, the config's own keys, the kept-index map, every FF tensor's shape, and
    with ``original`` every kept expert, router row, shared expert and dense layer."""
    export_dir, problems = report.export_dir, report.problems
    record = read_record(manifest, problems)
    if record is None:
        return
    tensors = _read_index_map(export_dir, record.sizes.width_total, problems)
    kept = None if tensors is None else check_index_map(tensors, manifest, record, problems)
    report.checked.append("kept-index map (experts and neurons)")
    try:
        config = export_config(export_dir)
        model = meta_model(config)
    except Exception as exc:  # transformers' config and model classes raise many types
        problems.append(
            f"config.json: transformers cannot build the model it describes "
            f"({type(exc).__name__}: {first_line(exc)}), so its sizes and the weights' shapes "
            "were not checked; fix config.json or re-export"
        )
        return
    problems.extend(config_problems(spec, config, record))
    kinds = layer_kind_problems(spec, model, record)
    problems.extend(kinds)
    with contextlib.ExitStack() as stack:
        files, found = weight_files(export_dir)
        problems.extend(found)
        try:
            reader = stack.enter_context(SafetensorsReader(files))
            exported = ModuleReader(reader, manifest["source"]["model_type"])
        except (SafetensorError, OSError, UnsupportedArchitectureError) as exc:
            problems.append(f"weights unreadable ({first_line(exc)}); re-export")
            return
        shapes = shape_problems(spec, model, exported)
        problems.extend(shapes)
        report.checked.append("FF tensor shapes (routers, experts, shared, dense)")
        if original is not None and (kept is None or kinds or shapes):
            problems.append(
                f"original '{original}': not compared, since the kept-index map or the weights' "
                "shapes are unusable (see above); re-export"
            )
        elif original is not None and kept is not None:
            _moe_against_original(
                spec, manifest, model, exported, kept, str(original), stack, problems
            )
            report.checked.append("kept experts, routers and FF tensors against the original")
        report.manifest, report.moe_keep = manifest, kept


def _moe_against_original(
    spec: ArchSpec,
    manifest: dict[str, Any],
    model: nn.Module,
    exported: ModuleReader,
    kept: list[KeptLayer],
    original: str,
    stack: contextlib.ExitStack,
    problems: list[str],
) -> None:
    tensors = _open_same_original(spec, manifest, original, stack, problems)
    if tensors is None:
        return
    try:
        weights = ModuleReader(tensors, manifest["source"]["model_type"])
    except UnsupportedArchitectureError as exc:
        problems.append(f"original '{original}': {exc}")
        return
    dtype = _torch_dtype(manifest["dtype"])
    check = OriginalCheck(
        spec, model, exported, weights, dtype, manifest.get("compensation"), problems
    )
    check.run(kept)
    if manifest.get("compensation"):
        ff_keys = {k for name in check.covered for k in exported.checkpoint_keys(name)}
        _check_untouched(exported.reader, tensors, ff_keys, dtype, problems)


def _check_untouched(
    exported: SafetensorsReader,
    tensors: SafetensorsReader,
    ff_keys: set[str],
    dtype: torch.dtype,
    problems: list[str],
) -> None:
    """Every non-FF tensor of a compensated export equals the original's (cast to the
    export's dtype): compensation changes the down projections only."""
    for key in exported.keys():  # noqa: SIM118
        if key in ff_keys:
            continue
        if key not in tensors:
            problems.append(f"{key}: in the export but not in the original")
            continue
        got, want = exported.get(key), tensors.get(key)
        if got.is_floating_point() and want.is_floating_point():
            want = want.to(dtype)
        if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
            problems.append(
                f"{key}: differs from the original (compensation changes only the down "
                "projections); re-export"
            )


# -- helpers ------------------------------------------------------------------------------------


def _original_directory(original: str) -> Path:
    return resolve_source(original).directory


def _open_original(directory: Path, stack: contextlib.ExitStack) -> SafetensorsReader:
    check_safetensors_files(directory)
    files = list_shards(directory).files
    if not files:
        raise ModelLoadError(
            f"the original '{directory}' has no *.safetensors weights; verify reads safetensors "
            "only (convert pickle checkpoints first)"
        )
    try:
        return stack.enter_context(SafetensorsReader(files))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"the original's weights in '{directory}' are unreadable ({first_line(exc)}); "
            "re-download or re-convert it"
        ) from exc


def _ff_keys(spec: ArchSpec, n_layers: int, tensors: SafetensorsReader) -> Iterator[str]:
    for layer in range(n_layers):
        for role in spec.roles():
            for kind in ("weight", "bias"):
                key = spec.param_name(layer, role, kind)
                if key in tensors:
                    yield key


def _compare_fingerprint(
    export_dir: str | Path, original: object, manifest: dict[str, Any], found: str
) -> None:
    if found != manifest["source"]["fingerprint"]:
        raise OriginalMismatchError(
            f"the original '{original}' is not the model '{export_dir}' was made from (its FF "
            f"weights differ from the fingerprint in {MANIFEST}); pass the original it was "
            f"exported from: {manifest['source'].get('model')}"
        )


def _require_manifest(export_dir: Path) -> dict[str, Any]:
    problems: list[str] = []
    manifest = _check_manifest(export_dir, problems)
    if manifest is None:
        raise VerificationError(f"'{export_dir}': {problems[0]}", problems)
    return manifest


def _torch_dtype(name: str) -> torch.dtype:
    return DTYPE_OPTIONS.get(name, torch.float32)
