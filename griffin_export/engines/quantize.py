"""Low-bit GGUFs (q4_k_m and friends) of griffin exports, by llama.cpp's own quantizer, with an
importance matrix from the prompt that chose the experts.

llama.cpp's converter (:func:`~griffin_export.engines.llamacpp.write_gguf`) writes f16; its
quantizer (``llama_model_quantize``, reached through the ``llama-cpp-python`` binding, the
``[llama]`` extra) then writes the final file in a child process (``_llamacpp_quantize.py``),
with the same time limit, streamed output and one-line errors as the converter.

The **importance matrix** is what ``llama-imatrix`` computes on a calibration text: for every
weight matrix that multiplies an activation, and every input column ``j`` of it, the energy
``sum_t x_tj^2`` of that column's input over the tokens ``t``. The quantizer weighs each
column's rounding error by it (a uniform scale of the matrix changes nothing). griffin computes
it on the exported (pruned, refitted) model over the prompt's tokens (:func:`prompt_imatrix`),
keyed by GGUF tensor name through the converter's own name map, and hands it to the quantizer
in memory (through a pipe to the child); ``output.weight`` is left out, as ``llama-imatrix``
leaves it out by default. :func:`read_imatrix_file` reads an imatrix file of llama.cpp's
(``llama-imatrix``'s GGUF format or its older ``.dat``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from griffin_export.engines.llamacpp import (
    DEFAULT_TIMEOUT,
    OUTTYPES,
    GgufResult,
    Progress,
    check_gguf_target,
    check_timeout,
    default_gguf_path,
    gguf_tensors,
    run_child,
    write_gguf,
)
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.layout import export_config, load_pretrained, require_export_dir
from griffin_export.formats.manifest import is_export, prompt_sha256, read_manifest
from griffin_export.storage.loading import load_tokenizer, require_tokenizer, tokenize_prompts
from griffin_export.storage.sources import SourceRef

#: The binding whose struct layout ``_llamacpp_quantize.py`` fills in (pyproject ``[llama]``).
BINDING = "llama-cpp-python"
BINDING_VERSION = "0.3.36"
#: How users install it.
INSTALL_HINT = (
    "pip install 'griffin-export[llama]' (it compiles llama.cpp: needs a C/C++ compiler and CMake)"
)
_DRIVER = Path(__file__).with_name("_llamacpp_quantize.py")
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


@dataclass(frozen=True)
class QuantType:
    """One of llama.cpp's quantizer types (``llama_ftype``)."""

    ftype: int
    #: values per quantization block: a row length that is not a multiple falls back
    block: int
    #: what llama.cpp writes instead for rows that are not whole blocks
    fallback: str
    #: llama.cpp refuses it without an importance matrix
    needs_imatrix: bool = False


#: The quantizer types offered (``llama_ftype`` values of llama.cpp's ``llama.h``), from the
#: largest file to the smallest; K and IQ types pack rows in blocks of 256.
QUANT_TYPES: dict[str, QuantType] = {
    "q6_k": QuantType(18, 256, "q8_0"),
    "q5_k_m": QuantType(17, 256, "q5_1 (q5_k) / q8_0 (q6_k)"),
    "q4_k_m": QuantType(15, 256, "q5_0 (q4_k) / q8_0 (q6_k)"),
    "q4_0": QuantType(2, 32, "f16"),
    "iq4_xs": QuantType(30, 256, "iq4_nl"),
    "q3_k_m": QuantType(12, 256, "q4_0 (q3_k) / q5_0 (q4_k)"),
    "iq2_xxs": QuantType(19, 256, "iq4_nl", needs_imatrix=True),
}
#: Types below q6_k, where an importance matrix from the prompt is the default.
IMATRIX_BY_DEFAULT = tuple(t for t in QUANT_TYPES if t != "q6_k")
#: ``--imatrix`` values besides a file: ``prompt`` (computed on the prompt) and ``none``.
IMATRIX_CHOICES = ("prompt", "none")
#: Every ``--outtype`` / ``--gguf`` type: the converter's own, then the quantizer's.
ALL_OUTTYPES = OUTTYPES + tuple(QUANT_TYPES)


def is_quantized(outtype: str) -> bool:
    """Whether ``outtype`` is written by the quantizer (not directly by the converter)."""
    return outtype in QUANT_TYPES


def needs_whole_blocks(outtype: str) -> int | None:
    """The row multiple (256) a K or IQ ``outtype`` needs for every tensor to get its type;
    ``None`` for the others."""
    quant = QUANT_TYPES.get(outtype)
    return quant.block if quant is not None and quant.block == 256 else None


def check_gguf_type(outtype: str) -> None:
    """A one-line :class:`UsageError` for a type neither the converter nor the quantizer
    writes; for a quantizer type, :func:`check_binding` (before anything loads)."""
    if outtype not in ALL_OUTTYPES:
        raise UsageError(f"GGUF type '{outtype}' is not one of {', '.join(ALL_OUTTYPES)}")
    if is_quantized(outtype):
        check_binding()


def check_binding() -> None:
    """Refuse, in one line, a missing ``llama-cpp-python`` or one whose version is not
    :data:`BINDING_VERSION` (whose struct layout the quantizer fills in). Reads the installed
    package's metadata only: nothing is loaded."""
    try:
        version = importlib.metadata.version(BINDING)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"llama.cpp's quantizer needs {BINDING}=={BINDING_VERSION}, which is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    if version != BINDING_VERSION:
        raise UsageError(
            f"llama.cpp's quantizer needs {BINDING}=={BINDING_VERSION} (the struct layout "
            f"griffin fills in), found {version}: pip install '{BINDING}=={BINDING_VERSION}'"
        )


def default_imatrix(outtype: str, have_prompt: bool) -> str:
    """``prompt`` for quantizer types below q6_k when the prompt is at hand, else ``none``."""
    return "prompt" if have_prompt and outtype in IMATRIX_BY_DEFAULT else "none"


# -- the importance matrix -----------------------------------------------------------------------


@dataclass
class Imatrix:
    """An importance matrix: per GGUF tensor name, one float32 weight per input column."""

    values: dict[str, np.ndarray]
    #: how it was made, recorded in the manifest: ``{"source": "prompt", "tokens",
    #: "prompt_sha256"}`` or ``{"source": "file", "file"}``
    record: dict[str, Any]

    def kv(self) -> list[tuple[str, int | str]]:
        """llama.cpp's ``quantize.imatrix.*`` metadata (as ``llama-quantize`` writes it)."""
        if self.record["source"] == "file":
            name, dataset = Path(self.record["file"]).name, str(self.record.get("dataset", ""))
        else:
            name, dataset = "griffin prompt", f"prompt sha256:{self.record['prompt_sha256']}"
        return [
            ("quantize.imatrix.file", name),
            ("quantize.imatrix.dataset", dataset),
            ("quantize.imatrix.entries_count", len(self.values)),
            ("quantize.imatrix.chunks_count", int(self.record.get("chunks", 1))),
        ]


def collect_imatrix(
    model: nn.Module, ids: Sequence[Tensor], names: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Per-column sums of squared inputs over the tokens of ``ids`` (each a 1-D tensor of
    token ids, run as one sequence), for every module whose weight is a key of ``names``
    (``"<module>.weight" -> the GGUF tensors made from it``, which share its input); keyed by
    GGUF name, float32.

    One forward pass per sequence with pre-hooks on those modules; the sums are kept in float64
    whatever the model's dtype."""
    sums: dict[str, Tensor] = {}
    handles = []

    def hook(targets: list[str]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def accumulate(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().double()
            x = x.reshape(-1, x.shape[-1])
            total = (x * x).sum(0)
            for name in targets:
                sums[name] = sums[name] + total if name in sums else total

        return accumulate

    for module_name, module in model.named_modules():
        targets = names.get(f"{module_name}.weight")
        weight = getattr(module, "weight", None)
        # matrices that multiply an activation: not embeddings (a lookup), not norms (1-D)
        if (
            targets
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and not isinstance(module, nn.Embedding)
        ):
            handles.append(module.register_forward_pre_hook(hook(targets)))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for sequence in ids:
                model(sequence.reshape(1, -1).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.float().cpu().numpy() for name, total in sums.items()}


def prompt_imatrix(
    export_dir: Path,
    ids: Sequence[Tensor],
    names: dict[str, list[str]],
    widths: dict[str, int],
    prompts: Sequence[str],
) -> Imatrix:
    """The importance matrix of the export in ``export_dir`` over the prompt tokens ``ids``
    (:func:`collect_imatrix`), for the GGUF tensors of ``widths`` (name -> row length) that
    ``names`` (HF tensor -> GGUF tensors) reaches; ``prompts`` are the texts, for the record."""
    model = load_pretrained(export_dir)
    model.eval()
    wanted = {
        hf: [g for g in made if g in widths and g != "output.weight"] for hf, made in names.items()
    }
    values = collect_imatrix(model, ids, wanted)
    values = {g: v for g, v in values.items() if v.size == widths[g]}
    record = {
        "source": "prompt",
        "tokens": int(sum(int(t.numel()) for t in ids)),
        "prompt_sha256": prompt_sha256(prompts),
        "entries": len(values),
        "chunks": len(ids),
    }
    return Imatrix(values, record)


def read_imatrix_file(path: str | Path) -> Imatrix:
    """An imatrix file of llama.cpp's ``llama-imatrix``: its GGUF format (``<tensor>.in_sum2``
    and ``<tensor>.counts``) or the older ``.dat`` format; each entry's values divided by its
    count, as ``llama-quantize`` reads them. One-line :class:`UsageError` when unreadable."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"--imatrix '{path}' is not a file; pass llama-imatrix's output, 'prompt' or 'none'"
        )
    try:
        with file.open("rb") as f:
            magic = f.read(4)
        values = _read_gguf_imatrix(file) if magic == b"GGUF" else _read_legacy_imatrix(file)
    except (OSError, ValueError, struct.error, IndexError, KeyError) as exc:
        raise UsageError(
            f"--imatrix '{path}' is not an imatrix file llama.cpp writes ({exc}); make one with "
            "llama-imatrix, or use --imatrix prompt"
        ) from exc
    if not values:
        raise UsageError(f"--imatrix '{path}' holds no entries; make one with llama-imatrix")
    return Imatrix(values, {"source": "file", "file": str(file), "entries": len(values)})


def _read_gguf_imatrix(file: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data, dtype=np.float32)
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name.removesuffix(".in_sum2")] = data.reshape(-1)
        elif tensor.name.endswith(".counts"):
            counts[tensor.name.removesuffix(".counts")] = data.reshape(-1)
    values = {}
    for name, total in sums.items():
        count = counts[name]
        per = total.reshape(len(count), -1)
        safe = np.where(count > 0, count, 1.0)[:, None]
        values[name] = np.where(count[:, None] > 0, per / safe, 1.0).reshape(-1).astype(np.float32)
    return values


def _read_legacy_imatrix(file: Path) -> dict[str, np.ndarray]:
    """llama.cpp's ``.dat``: int32 entry count; per entry int32 name length, the name, int32
    call count, int32 value count, float32 values (then the last call and dataset name)."""
    data = file.read_bytes()
    (n,), at = struct.unpack_from("<i", data, 0), 4
    values: dict[str, np.ndarray] = {}  # none when n <= 0: the caller refuses an empty file
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, at)
        name = data[at + 4 : at + 4 + length].decode()
        at += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, at)
        at += 8
        row = np.frombuffer(data, dtype="<f4", count=nval, offset=at).astype(np.float32)
        at += 4 * nval
        values[name] = row / ncall if ncall > 0 else row
    return values


# -- the quantizer -------------------------------------------------------------------------------


def quantize_gguf(
    source: Path,
    target: Path,
    outtype: str,
    *,
    imatrix: Imatrix | None = None,
    nthread: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Progress | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Quantize the GGUF ``source`` to ``outtype`` (:data:`QUANT_TYPES`) into ``target`` with
    llama.cpp's quantizer in a child process, handing it ``imatrix`` (and its metadata) through
    a pipe. ``progress`` gets ``("quantize", percent, 100)`` as tensors are written."""
    check_binding()
    quant = QUANT_TYPES[outtype]
    entries = [] if imatrix is None else sorted(imatrix.values.items())
    header = {
        "imatrix": [[name, int(v.size)] for name, v in entries],
        "kv": [] if imatrix is None else [list(kv) for kv in imatrix.kv()],
    }
    payload = json.dumps(header).encode() + b"\n"
    payload += b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for _, v in entries)
    threads = nthread if nthread is not None else max(1, os.cpu_count() or 1)
    command = [
        sys.executable,
        str(_DRIVER),
        str(source),
        str(target),
        str(quant.ftype),
        str(threads),
        BINDING_VERSION,
    ]
    report = progress or (lambda stage, done, total: None)

    def percent(line: str) -> int | None:
        match = _TENSOR_LINE.match(line)
        return int(100 * int(match.group(1)) / max(1, int(match.group(2)))) if match else None

    report("quantize", 0, 100)
    run_child(
        command,
        dict(os.environ),
        timeout,
        lambda pct: report("quantize", pct, 100),
        on_line,
        tool="llama.cpp's quantizer",
        percent=percent,
        stdin=payload,
    )
    report("quantize", 100, 100)


def fallback_warnings(path: Path, outtype: str, ff_widths: Sequence[int]) -> list[str]:
    """What llama.cpp wrote, read from the GGUF ``path``, for the 2-D tensors whose rows are
    not whole blocks of a K or IQ ``outtype``: which tensors got which type; names
    ``--multiple-of 256`` when FF widths (``ff_widths``, the ``ffn_down`` rows) are the cause."""
    block = needs_whole_blocks(outtype)
    if block is None:
        return []
    odd: dict[tuple[str, int, str], list[int]] = {}
    for name, (tensor_type, shape) in gguf_tensors(path).items():
        if len(shape) < 2 or shape[0] % block == 0:
            continue
        match = re.match(r"blk\.(\d+)\.(.+)", name)
        role, layer = (match.group(2), int(match.group(1))) if match else (name, -1)
        role = role.removesuffix(".weight")
        odd.setdefault((role, int(shape[0]), tensor_type.lower()), []).append(layer)
    if not odd:
        return []
    parts = []
    for (role, row, kind), layers in sorted(odd.items()):
        where = "" if layers == [-1] else f" in {len(layers)} layer(s)"
        parts.append(f"{role} (rows of {row}){where} -> {kind}")
    ff = sorted({k for k in ff_widths if k % block})
    fix = (
        f"; export with --multiple-of {block} so the FF widths ({', '.join(map(str, ff))}) "
        f"quantize as {outtype}"
        if ff
        else "; these are the source model's own widths, which griffin does not change"
    )
    return [
        f"llama.cpp's {outtype} needs rows of a multiple of {block} values, so it wrote "
        f"{'; '.join(parts)}{fix}"
    ]


def write_gguf_typed(
    export_dir: str | Path,
    out: str | Path | None = None,
    outtype: str = "f16",
    *,
    force: bool = False,
    imatrix: str | Path | None = None,
    calibration: Sequence[Tensor] | None = None,
    prompts: Sequence[str] = (),
    nthread: int | None = None,
    progress: Progress | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> GgufResult:
    """Write a griffin export as one GGUF of any type of :data:`ALL_OUTTYPES`: the converter's
    types directly (:func:`~griffin_export.engines.llamacpp.write_gguf`); the quantizer's
    (:data:`QUANT_TYPES`) by converting to f16 first, then quantizing, both into temporary
    files beside ``out``, renamed when complete (a failed run leaves nothing).

    Args:
        imatrix: ``"prompt"`` (computed on the export over ``calibration``, the prompt's token
            ids, whose texts are ``prompts``), ``"none"``, or an imatrix file of llama.cpp's
            (:func:`read_imatrix_file`); default :func:`default_imatrix`. Only with a quantizer
            type.
        nthread: quantizer threads (default: every CPU).
        progress: optional ``(stage, done, total)`` callback: ``gguf`` (the converter, %),
            ``imatrix`` (0 then 1) and ``quantize`` (%).
        timeout: seconds each of the converter and the quantizer may run.

    The result's ``imatrix`` records which importance matrix was used; its ``warnings`` name
    the tensors llama.cpp wrote in a fallback type (:func:`fallback_warnings`).
    """
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    check_gguf_type(outtype)
    check_timeout(timeout)
    if not is_quantized(outtype) and (prompts or calibration is not None):
        raise UsageError(
            f"--prompt calibrates the quantizer's types ({', '.join(QUANT_TYPES)}), not "
            f"{outtype}; drop it or choose one of those"
        )
    if calibration is None and prompts:
        calibration = prompt_ids(require_export_dir(export_dir), prompts)
    choice, given = check_imatrix(outtype, imatrix, calibration is not None)
    if not is_quantized(outtype):
        return write_gguf(
            export_dir,
            out,
            outtype,
            force=force,
            progress=progress,
            on_line=on_line,
            timeout=timeout,
        )
    directory = Path(export_dir)
    target = Path(out) if out is not None else default_gguf_path(directory, outtype)
    check_gguf_target(target, force)
    f16 = target.with_name(f".{target.name}.griffin-f16-{os.getpid()}")
    tmp = target.with_name(f".{target.name}.griffin-tmp-{os.getpid()}")
    try:
        names: dict[str, list[str]] = {}
        converted = write_gguf(
            directory,
            f16,
            "f16",
            force=True,
            progress=progress,
            on_line=on_line,
            timeout=timeout,
            name_map=names,
        )
        widths = {n: shape[0] for n, (_, shape) in gguf_tensors(f16).items() if len(shape) > 1}
        used: Imatrix | None = None
        if choice == "prompt" and calibration is not None:
            report("imatrix", 0, 1)
            used = prompt_imatrix(directory, calibration, names, widths, prompts)
            report("imatrix", 1, 1)
        elif given is not None:
            used = _matching(given, widths, choice)
        quantize_gguf(
            f16,
            tmp,
            outtype,
            imatrix=used,
            nthread=nthread,
            timeout=timeout,
            progress=progress,
            on_line=on_line,
        )
        if not tmp.is_file():
            raise ExportFormatError(f"llama.cpp's quantizer wrote no file for '{directory}'")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        f16.unlink(missing_ok=True)
    return GgufResult(
        path=target,
        outtype=outtype,
        architecture=converted.architecture,
        ff_widths=converted.ff_widths,
        file_bytes=target.stat().st_size,
        seconds=time.perf_counter() - started,
        warnings=fallback_warnings(target, outtype, converted.ff_widths),
        imatrix={"source": "none"} if used is None else dict(used.record),
    )


def check_imatrix(
    outtype: str, imatrix: str | Path | None, have_prompt: bool
) -> tuple[str, Imatrix | None]:
    """The importance matrix choice for ``outtype`` (``imatrix``: ``"prompt"``, ``"none"``, a
    file, or ``None`` for :func:`default_imatrix`) and the file's contents when it is one;
    one-line :class:`UsageError` for a choice that cannot apply. Checks the type first
    (:func:`check_gguf_type`), so a missing binding is said before anything loads."""
    check_gguf_type(outtype)
    choice = str(imatrix) if imatrix is not None else None
    if not is_quantized(outtype):
        if choice not in (None, "none"):
            raise UsageError(
                f"--imatrix calibrates the quantizer's types ({', '.join(QUANT_TYPES)}), not "
                f"{outtype}; drop it or choose one of those"
            )
        return "none", None
    choice = choice or default_imatrix(outtype, have_prompt)
    if choice == "prompt" and not have_prompt:
        raise UsageError(
            "--imatrix prompt needs the prompt: pass --prompt FILE (griffin gguf), or use "
            "--imatrix none or an imatrix FILE"
        )
    if QUANT_TYPES[outtype].needs_imatrix and choice == "none":
        raise UsageError(
            f"llama.cpp quantizes {outtype} only with an importance matrix; use --imatrix "
            "prompt (with the prompt) or an imatrix FILE"
        )
    return choice, read_imatrix_file(choice) if choice not in IMATRIX_CHOICES else None


def prompt_ids(export_dir: str | Path, prompts: Sequence[str]) -> list[Tensor]:
    """Token ids of each prompt with the export's own tokenizer, as ``griffin export``
    tokenized the prompt that chose the experts (:func:`~griffin_export.storage.loading.
    tokenize_prompts`): truncated to the ``--max-prompt-tokens`` its manifest records and to
    its context; prompts without tokens left out."""
    directory = Path(export_dir)
    source = SourceRef(str(directory), "directory", directory, str(directory))
    tokenizer = require_tokenizer(load_tokenizer(source), directory)
    context = getattr(export_config(directory), "max_position_embeddings", None)
    max_tokens = read_manifest(directory).prompt.max_tokens if is_export(directory) else None
    ids, _ = tokenize_prompts(tokenizer, prompts, max_tokens, context)
    return ids


def _matching(given: Imatrix, widths: dict[str, int], choice: str) -> Imatrix:
    """The entries of an imatrix file that match the GGUF's tensors (name and row length);
    one-line :class:`UsageError` when none does (a file made for another model)."""
    values = {n: v for n, v in given.values.items() if widths.get(n) == v.size}
    if not values:
        raise UsageError(
            f"--imatrix '{choice}' matches none of this export's tensors (made for another "
            "model or before pruning?); use --imatrix prompt"
        )
    return Imatrix(values, given.record | {"entries": len(values)})
