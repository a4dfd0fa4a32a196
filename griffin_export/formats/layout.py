"""Exports whose FF layers keep different numbers of neurons, and the one call that loads
any export: :func:`load_pretrained`.

Stock Llama/Mistral/Qwen/... configs hold one integer ``intermediate_size`` (transformers 5
validates it as an ``int``), so a non-uniform export is stored as:

* ``config.json``: the source's ``model_type`` and architecture, ``intermediate_size`` set to
  the **largest** per-layer width, and ``griffin.intermediate_sizes``: the list of per-layer
  widths (layer order). Stock ``from_pretrained`` refuses such a directory with a shape
  mismatch (it never loads it silently wrong).
* the weights exactly as a uniform export writes them, each FF tensor at its own layer's
  width (safetensors headers carry the shapes; :func:`checkpoint_ff_sizes` reads them back
  without loading any data).

Uniform exports keep a plain integer ``intermediate_size`` and no list, and load with stock
``AutoModelForCausalLM.from_pretrained``; :func:`load_pretrained` does exactly that for them.
For a non-uniform one it builds the model with a 1-neuron FF (so everything else is
initialised as transformers does, rotary tables included), gives each layer's FF
projections their recorded widths, and loads the checkpoint into them strictly.

The DeciLM / Nemotron-NAS layout of the same weights (``--format decilm``) is
:mod:`griffin_export.formats.decilm`; :func:`export_config` reads either layout back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.core.slicing import check_keep, prune_block
from griffin_export.errors import ExportFormatError, ModelLoadError, UsageError, first_line
from griffin_export.formats.decilm import is_decilm, source_config
from griffin_export.formats.manifest import SIZES_KEY
from griffin_export.storage.jsonfile import read_json_object
from griffin_export.storage.loading import load_generation_config, move_to_device
from griffin_export.storage.safetensors_io import (
    SINGLE_NAME,
    SafetensorsReader,
    list_shards,
    load_state,
)


def per_layer_sizes(config: Any) -> list[int] | None:
    """The per-layer FF widths a config records (``griffin.intermediate_sizes``), or ``None``
    for a uniform (stock) config."""
    block = getattr(config, "griffin", None)
    sizes = block.get(SIZES_KEY) if isinstance(block, dict) else None
    if sizes is None:
        return None
    if not isinstance(sizes, list) or not all(isinstance(k, int) and k > 0 for k in sizes):
        raise ExportFormatError(
            f"config.json griffin.{SIZES_KEY} is {sizes!r}; it must list one positive integer "
            "per layer -- re-run griffin export"
        )
    return list(sizes)


def set_per_layer_sizes(spec: ArchSpec, config: Any, sizes: Sequence[int]) -> None:
    """Record per-layer widths on ``config``: the largest as its integer FF width and the list
    under ``griffin.intermediate_sizes`` (dropped again when all layers are equal, so uniform
    configs stay stock)."""
    sizes = [int(k) for k in sizes]
    spec.set_d_ff(config, max(sizes))
    existing = getattr(config, "griffin", None)
    block = dict(existing or {})
    if len(set(sizes)) > 1:
        block[SIZES_KEY] = sizes
    else:
        block.pop(SIZES_KEY, None)
    if block or existing is not None:  # a uniform budget leaves a stock config untouched
        config.griffin = block


def prune_model_per_layer(spec: ArchSpec, model: nn.Module, keep: Sequence[Tensor]) -> None:
    """Like :func:`griffin_export.core.slicing.prune_model`, but each layer may keep a different
    number of neurons; the config records them (:func:`set_per_layer_sizes`)."""
    blocks = spec.blocks(model)
    d_ff = spec.d_ff(model.config)
    check_keep(keep, len(blocks), d_ff)
    for block, idx in zip(blocks, keep, strict=True):
        prune_block(spec, block, idx, d_ff)
    set_per_layer_sizes(spec, model.config, [int(k.numel()) for k in keep])


def checkpoint_ff_sizes(directory: str | Path, spec: ArchSpec, n_layers: int) -> list[int]:
    """Per-layer FF widths read from the safetensors headers (the down projections' neuron
    axis), without loading tensor data."""
    shapes = _header_shapes(Path(directory))
    sizes = []
    for layer in range(n_layers):
        key = spec.param_name(layer, "down")
        if key not in shapes:
            raise ExportFormatError(
                f"'{directory}' has no tensor '{key}'; the checkpoint is incomplete -- re-run "
                "griffin export"
            )
        sizes.append(int(shapes[key][spec.neuron_axis("down")]))
    return sizes


def require_export_dir(path: str | Path) -> Path:
    """``path`` as an export directory: one ``UsageError`` line for a model file (a ``.gguf``,
    a safetensors file: how to make an export from it) or a directory without config.json."""
    directory = Path(path)
    if directory.is_file():
        raise UsageError(
            f"'{path}' is a file; this command needs an export directory: make one with "
            f"griffin export --model {path}"
        )
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"'{path}' is not an export directory (no config.json); pass the directory "
            "griffin export --out wrote"
        )
    return directory


def load_pretrained(
    directory: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a griffin export (uniform or per-layer budgets, ``hf`` or ``decilm`` layout) as a
    standard ``transformers`` ``*ForCausalLM`` in eval mode. A DeciLM checkpoint made elsewhere
    loads too (as ``LlamaForCausalLM``) when every layer is an attention and an FF block.

    Args:
        directory: the export directory (``config.json`` + safetensors).
        dtype: parameter dtype; default the checkpoint's (``config.dtype``).
        device: where the weights go.

    Uniform exports go through stock ``AutoModelForCausalLM.from_pretrained``. Raises
    :class:`~griffin_export.errors.ExportFormatError` for a malformed directory.
    """
    from transformers import AutoModelForCausalLM

    path = require_export_dir(directory)
    config = export_config(path)
    sizes = per_layer_sizes(config)
    wanted = dtype if dtype is not None else (getattr(config, "dtype", None) or torch.float32)
    dtype = getattr(torch, wanted) if isinstance(wanted, str) else wanted
    if not isinstance(dtype, torch.dtype):
        raise ExportFormatError(
            f"dtype {wanted!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'float32'"
        )
    if sizes is None:
        stock: nn.Module = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True
        )
        return move_to_device(stock, device).eval()

    spec = spec_for(config.model_type)
    n_layers = getattr(config, "num_hidden_layers", len(sizes))
    if len(sizes) != n_layers:
        raise ExportFormatError(
            f"config.json lists {len(sizes)} FF widths for {n_layers} layers; the export was "
            "modified -- re-run griffin export"
        )
    on_disk = checkpoint_ff_sizes(path, spec, len(sizes))
    if on_disk != sizes:
        raise ExportFormatError(
            f"config.json lists FF widths {sizes} but the weights in '{directory}' have "
            f"{on_disk}; the export was modified -- re-run griffin export"
        )
    # Build with a 1-neuron FF (cheap), then give every layer its own width. Everything that
    # is not FF is constructed exactly as transformers does (buffers included).
    skeleton = config.__class__.from_dict(config.to_dict())
    spec.set_d_ff(skeleton, 1)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(skeleton, dtype=dtype)
    for block, k in zip(spec.blocks(model), sizes, strict=True):
        _resize_block(spec, block, k, dtype)
    state = load_state(export_shards(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ExportFormatError(
            f"'{directory}' does not match its config: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; re-run griffin export"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    spec.set_d_ff(model.config, max(sizes))
    model.config.griffin = dict(config.griffin)
    # from_config made a generation config from config.json alone; the export's own file
    # (its end tokens) is what from_pretrained would have used.
    generation, _ = load_generation_config(path)
    if generation is not None:
        model.generation_config = generation
    return move_to_device(model, device).eval()


def _resize_block(spec: ArchSpec, block: nn.Module, k: int, dtype: torch.dtype) -> None:
    """Give one block's FF projections width ``k`` (uninitialised; the checkpoint fills them)."""
    for role, module in spec.projections(block).items():
        weight = module.weight
        assert isinstance(weight, Tensor)
        shape = list(weight.shape)
        axis = spec.neuron_axis(role)
        shape[axis] = 2 * k if role == "gate_up" else k
        module.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and role != "down":
            module.bias = nn.Parameter(
                torch.empty(2 * k if role == "gate_up" else k, dtype=dtype), requires_grad=False
            )
    # keep in_features/out_features (and Conv1D nx/nf) consistent with the new shapes
    prune_block(spec, block, torch.arange(k), k)


def export_shards(directory: Path) -> list[Path]:
    """The safetensors weight files of an export (its index's shards, or model.safetensors);
    ``ExportFormatError`` when any is missing or the index is unreadable."""
    try:
        shards = list_shards(directory)
    except ModelLoadError as exc:
        raise ExportFormatError(f"{exc}") from exc
    if shards.missing or not shards.files:
        absent = shards.missing or [SINGLE_NAME]
        raise ExportFormatError(
            f"'{directory}' lacks weight file(s) {absent}; copy the whole export directory"
        )
    return shards.files


def _header_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    with SafetensorsReader(export_shards(directory)) as tensors:
        for key in tensors.keys():  # noqa: SIM118 (not a mapping)
            shapes[key] = tensors.shape(key)
    return shapes


def export_config(directory: str | Path) -> Any:
    """The transformers config of an export (either layout) or model directory: a DeciLM
    ``config.json`` as its family's own config (:func:`source_config`), others as
    ``AutoConfig`` reads them. Never runs remote code."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(directory) / "config.json"
    try:
        raw = read_json_object(path)
    except ValueError as exc:
        raise ExportFormatError(f"'{path}' is {exc}; re-export") from exc
    if not is_decilm(raw):
        try:
            return AutoConfig.from_pretrained(directory, trust_remote_code=False)
        except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ...
            raise ExportFormatError(
                f"'{path}' is not a transformers config ({first_line(exc, 200)}); re-export"
            ) from exc
    data = source_config(raw)
    spec_for(data["model_type"])  # names an unsupported family in one line
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)
