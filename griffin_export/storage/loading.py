"""Loading a resolved source for export: the checks made before any weights are read (the
architecture, whole safetensors files, no pickles), the model, its tokenizer, ``--dtype`` and
``--device``. Safe by default: safetensors only, no remote code.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.errors import ModelLoadError, UsageError, first_line
from griffin_export.storage.jsonfile import read_json_object
from griffin_export.storage.safetensors_io import INDEX_NAME, SafetensorsReader, list_shards
from griffin_export.storage.sources import TOKENIZER_FILES, SourceRef, save_tokenizer

#: ``--dtype`` names (and the manifest's ``dtype``) -> torch dtypes; safetensors' own dtype
#: codes are :data:`~griffin_export.storage.safetensors_io.SAFETENSORS_DTYPES`
DTYPE_OPTIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``None``/``"auto"`` keeps the source's dtype; otherwise one of :data:`DTYPE_OPTIONS`."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPE_OPTIONS[name.lower()]
    except KeyError:
        raise UsageError(
            f"--dtype '{name}' is not known; use one of auto, float32, bfloat16, float16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
            f"could not read the config of '{source.name}': {first_line(exc)}; {hint}"
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
            f"could not load '{source.name}': {first_line(exc)}; re-download or re-convert it"
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
            f"--device '{device}' is not usable here ({first_line(exc)}); use cpu"
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
        raw = read_json_object(config_path)
    except ValueError as exc:
        raise ModelLoadError(f"'{config_path}' is {exc}; restore the model's config.json") from exc
    model_type = raw.get("model_type")
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
            SafetensorsReader([path]).close()
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"'{path}' is truncated or corrupted ({first_line(exc)}); re-download or "
                "re-convert the model"
            ) from exc


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
