"""Loading a resolved source for export: the checks made before any weights are read (the
architecture, whole safetensors files, no pickles), the model, its tokenizer, ``--dtype`` and
``--device``. Safe by default: safetensors only, no remote code.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.errors import ModelLoadError, UsageError, first_line
from griffin_export.storage.jsonfile import read_json_object
from griffin_export.storage.safetensors_io import INDEX_NAME, SafetensorsReader, list_shards
from griffin_export.storage.sources import TOKENIZER_FILES, SourceRef, save_tokenizer

ModuleT = TypeVar("ModuleT", bound=nn.Module)

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
    #: what loading noticed but did not refuse (an unreadable ``generation_config.json``)
    warnings: list[str] = field(default_factory=list)


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
    move_to_device(model.eval(), device)
    _, warnings = load_generation_config(source.directory)
    return LoadedModel(model, load_tokenizer(source), spec, model_type, source, warnings=warnings)


#: What torch says when a device cannot be used at all: not built in, no driver or no such
#: device, or a device string it does not know.
_UNUSABLE_DEVICE = re.compile(
    r"not compiled with|no nvidia driver|no cuda gpus|invalid device ordinal|device string|"
    r"not linked with support|driver initiali[sz]ation|backend is supported|"
    r"with arguments from the '\w+' backend|no (?:cuda|xpu|mps|hip) device|is not available",
    re.IGNORECASE,
)


@contextlib.contextmanager
def _device_errors(device: str | torch.device) -> Iterator[None]:
    """Turn torch's errors that mean "this device cannot take the model" into one line:
    out of memory (a smaller ``--dtype`` or cpu), or a device that is not usable here at all
    (cpu). Any other error is a bug or a broken model and propagates unchanged."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise UsageError(
            f"out of memory on --device '{device}' ({first_line(exc, 200)}); use a smaller "
            "--dtype (bfloat16 or float16) or --device cpu"
        ) from exc
    except (RuntimeError, AssertionError) as exc:
        if not _UNUSABLE_DEVICE.search(str(exc)):
            raise
        raise UsageError(
            f"--device '{device}' is not usable here ({first_line(exc, 200)}); use --device cpu"
        ) from exc


def device_for(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` after checking that a tensor can be put there
    (``UsageError`` naming the fix when it cannot; see :func:`move_to_device`)."""
    with _device_errors(device):
        target = torch.device(device)
        if target.type not in ("cpu", "meta"):
            torch.empty(0, device=target)
    return target


def move_to_device(module: ModuleT, device: str | torch.device) -> ModuleT:
    """``module.to(device)``, with the errors that mean the device cannot take it (out of
    memory, no such device, torch built without it) as one ``UsageError`` line naming the
    fix; every other error propagates."""
    with _device_errors(device):
        module.to(device)
    return module


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
    """The source's tokenizer; ``None`` only when its directory holds no tokenizer files
    (:data:`~griffin_export.storage.sources.TOKENIZER_FILES`; a bare weights directory). Files
    that are there but do not load are a ``ModelLoadError`` naming them and why."""
    from transformers import AutoTokenizer

    present = [name for name in TOKENIZER_FILES if (source.directory / name).is_file()]
    if not present:
        return None
    try:
        return AutoTokenizer.from_pretrained(source.load_id, trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise many types for bad files
        raise ModelLoadError(
            f"the tokenizer of '{source.name}' ({', '.join(present)}) does not load: "
            f"{first_line(exc, 200)}; restore or re-download those files"
        ) from exc


def require_tokenizer(tokenizer: Any | None, name: str | Path) -> Any:
    """``tokenizer`` (from :func:`load_tokenizer`), or the one-line ``UsageError`` every
    command gives for a model or export ``name`` without tokenizer files."""
    if tokenizer is None:
        raise UsageError(
            f"'{name}' has no tokenizer files; add them to its directory (an export has them "
            "when the model it was made from does)"
        )
    return tokenizer


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], max_tokens: int | None, context: Any
) -> tuple[list[torch.Tensor], list[str]]:
    """Token ids of each prompt, truncated to ``max_tokens`` (``--max-prompt-tokens``) and the
    model's ``context`` (``max_position_embeddings``; ignored unless a positive int), and a
    warning per truncated prompt. A prompt with no tokens is dropped (with a warning); none
    left is a ``UsageError``."""
    limits = [v for v in (max_tokens, context) if isinstance(v, int) and v > 0]
    limit = min(limits) if limits else None
    warnings: list[str] = []
    ids: list[torch.Tensor] = []
    for i, text in enumerate(prompts):
        encoded = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if encoded.numel() == 0:
            warnings.append(f"prompt {i + 1} has no tokens; it is left out")
            continue
        if limit is not None and encoded.numel() > limit:
            why = "--max-prompt-tokens" if limit == max_tokens else "the model's context length"
            warnings.append(
                f"prompt {i + 1} has {encoded.numel()} tokens; truncated to {limit} ({why})"
            )
            encoded = encoded[:limit]
        ids.append(encoded)
    if not ids:
        raise UsageError("the prompt has no tokens; pass a prompt with some text")
    return ids, warnings


#: The file whose end tokens (``eos_token_id``) and sampling defaults generation uses.
GENERATION_CONFIG = "generation_config.json"


def load_generation_config(directory: Path) -> tuple[Any | None, list[str]]:
    """The ``GenerationConfig`` in ``directory`` and warnings: ``(None, [])`` when it has no
    :data:`GENERATION_CONFIG` (the model config's end tokens apply, as in
    ``from_pretrained``); ``(None, [why])`` when the file is there but does not load, which
    ``from_pretrained`` passes over in silence although its end tokens are then lost."""
    from transformers import GenerationConfig

    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return None, []
    try:
        return GenerationConfig.from_pretrained(directory), []
    except Exception as exc:  # OSError for bad JSON, ValueError/TypeError for bad values
        return None, [
            f"'{path}' does not load ({first_line(exc, 200)}), so its end tokens and "
            "generation defaults are not used (the model config's eos_token_id is); fix or "
            "remove the file"
        ]


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
