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

``griffin export --format decilm`` writes the same weights with a DeciLM / Nemotron-NAS
``config.json`` instead (:func:`decilm_config`), for families with Llama's graph
(:func:`~griffin_export.core.architectures.llama_graph_problem`): ``architectures``
``["DeciLMForCausalLM"]``, ``model_type`` ``nemotron-nas`` and one ``block_configs`` entry per
layer whose ``ffn.ffn_mult`` gives the layer's width. vLLM's ``DeciLMForCausalLM`` and
llama.cpp's converter turn ``ffn_mult`` into a width as :func:`ffn_mult_width` does
(``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256), so only widths that are
multiples of 256 can be stored; :func:`ffn_mult_for` picks an ``ffn_mult`` that gives back the
exact width, and anything else is refused before a file is written. The source's
``model_type`` and ``architectures`` stay in the ``griffin`` block, so :func:`export_config`
reads such a directory back as the family's own config with per-layer widths (transformers has
no DeciLM class without remote code, which griffin never runs). Gemma 3n, for comparison, puts
a list in ``intermediate_size`` (its own config class allows it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec, llama_graph_problem, spec_for
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.slicing import check_keep, prune_block
from griffin_export.errors import ExportFormatError, ModelLoadError, UsageError
from griffin_export.formats.manifest import SIZES_KEY
from griffin_export.storage.safetensors_io import SINGLE_NAME, LazyTensors, list_shards, load_state


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

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{directory}' has no config.json; pass a griffin export directory (griffin export "
            "--out DIR writes one)"
        )
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
        return _to_device(stock, device)

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
    return _to_device(model, device)


def _to_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    try:
        return model.to(device).eval()
    except Exception as exc:
        raise UsageError(f"--device '{device}' is not usable here ({exc}); use cpu") from exc


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
    with LazyTensors(export_shards(directory)) as tensors:
        for key in tensors.keys():  # noqa: SIM118 (not a mapping)
            shapes[key] = tensors.shape(key)
    return shapes


# -- the DeciLM / Nemotron-NAS layout (``--format decilm``) -------------------------------------

DECILM_ARCHITECTURE = "DeciLMForCausalLM"
#: the model_type of NVIDIA's Nemotron-NAS checkpoints (Llama-3_1-Nemotron-51B), which vLLM keys on
DECILM_MODEL_TYPE = "nemotron-nas"
#: vLLM and llama.cpp round every ``ffn_mult`` width up to a multiple of this
DECILM_MULTIPLE = 256


#: fields that llama.cpp's converter reads from a DeciLM config.json without a default
_DECILM_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
)


def ffn_mult_width(ffn_mult: float, hidden_size: int) -> int:
    """The FF width that vLLM's ``DeciLMForCausalLM`` and llama.cpp's converter build for
    ``ffn_mult``: ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // DECILM_MULTIPLE) * DECILM_MULTIPLE


def ffn_mult_for(width: int, hidden_size: int) -> float:
    """An ``ffn_mult`` for which :func:`ffn_mult_width` gives exactly ``width`` (``1.5 * width
    / hidden``, nudged by the last bit if rounding needs it); ``UsageError`` when no value can,
    i.e. ``width`` is not a positive multiple of 256."""
    if width < DECILM_MULTIPLE or width % DECILM_MULTIPLE:
        raise UsageError(
            f"FF width {width} cannot be stored as a DeciLM ffn_mult (vLLM and llama.cpp round "
            f"widths up to a multiple of {DECILM_MULTIPLE}); use --multiple-of "
            f"{DECILM_MULTIPLE} or --format hf"
        )
    mult = 1.5 * width / hidden_size
    for _ in range(4):
        got = ffn_mult_width(mult, hidden_size)
        if got == width:
            return mult
        mult = math.nextafter(mult, math.inf if got < width else -math.inf)
    raise UsageError(  # not reached for widths that are multiples of 256 (tests/test_decilm.py)
        f"no ffn_mult gives FF width {width} for hidden size {hidden_size}; use --format hf"
    )


def decilm_config(config: dict[str, Any], sizes: Sequence[int]) -> dict[str, Any]:
    """The DeciLM / Nemotron-NAS ``config.json`` of an export whose source config (as
    ``save_pretrained`` writes it: ``config.to_diff_dict()``, with its ``griffin`` block) has
    Llama's graph and whose layers keep ``sizes`` neurons. Every field of the source stays
    (engines read the Llama ones); the source's ``model_type`` and ``architectures`` move into
    the ``griffin`` block."""
    problem = llama_graph_problem(SimpleNamespace(**config))
    if problem is not None:
        raise UsageError(f"--format decilm needs Llama's graph: {problem}; use --format hf")
    absent = [key for key in _DECILM_FIELDS if key not in config]
    if absent:
        raise UsageError(
            f"the config lacks {', '.join(absent)}, which DeciLM readers need; use --format hf"
        )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    griffin = dict(config.get("griffin") or {})
    griffin.pop(SIZES_KEY, None)
    griffin.update(model_type=config["model_type"], architectures=config.get("architectures"))
    out = {k: v for k, v in config.items() if k != "intermediate_size"}
    out.update(
        architectures=[DECILM_ARCHITECTURE],
        model_type=DECILM_MODEL_TYPE,
        griffin=griffin,
        # Read by llama.cpp's converter and by Nemotron-NAS' own config class (transformers 4
        # names); transformers 5 keeps them in rope_parameters.
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        block_configs=[
            {
                "attention": {
                    "n_heads_in_group": heads // kv_heads,
                    "no_op": False,
                    "replace_with_linear": False,
                },
                "ffn": {
                    "ffn_mult": ffn_mult_for(int(k), hidden),
                    "no_op": False,
                    "replace_with_linear": False,
                },
            }
            for k in sizes
        ],
    )
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        out["rope_scaling"] = scaling
    return out


def is_decilm(config: dict[str, Any]) -> bool:
    """Whether a raw ``config.json`` is in the DeciLM / Nemotron-NAS layout."""
    return "block_configs" in config or DECILM_ARCHITECTURE in (config.get("architectures") or [])


def source_config(config: dict[str, Any]) -> dict[str, Any]:
    """A raw ``config.json`` as its family's own config: a DeciLM one translated back (the
    ``griffin`` block's ``model_type``, else Llama; per-layer widths from ``ffn_mult`` under
    ``griffin.intermediate_sizes``), any other returned unchanged. ``ExportFormatError`` for a
    DeciLM layer that is not an attention and an FF block of Llama's graph."""
    if not is_decilm(config):
        return config
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    blocks = config.get("block_configs")
    if not isinstance(blocks, list) or not isinstance(hidden, int) or not isinstance(heads, int):
        raise ExportFormatError(
            "config.json is a DeciLM config without block_configs, hidden_size or "
            "num_attention_heads; re-export it"
        )
    groups, sizes = set(), []
    for i, block in enumerate(blocks):
        plain = _plain_block(block)
        if plain is None:
            raise ExportFormatError(
                f"config.json block_configs[{i}] is not an attention and an FF block "
                f"({block!r}); griffin loads only DeciLM checkpoints with Llama's graph in every "
                "layer"
            )
        groups.add(plain[0])
        sizes.append(ffn_mult_width(plain[1], hidden))
    if len(groups) != 1 or heads % next(iter(groups)):
        raise ExportFormatError(
            f"config.json block_configs have n_heads_in_group {sorted(groups)} for "
            f"{heads} heads; griffin needs one group size that divides them"
        )
    griffin = dict(config.get("griffin") or {})
    out = {k: v for k, v in config.items() if k != "block_configs"}
    out["model_type"] = griffin.pop("model_type", None) or "llama"
    out["architectures"] = griffin.pop("architectures", None) or ["LlamaForCausalLM"]
    out["num_key_value_heads"] = heads // next(iter(groups))
    out["intermediate_size"] = max(sizes)
    if "rope_parameters" in config:  # written beside it for other readers (decilm_config)
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    if len(set(sizes)) > 1:
        griffin[SIZES_KEY] = sizes
    if griffin:
        out["griffin"] = griffin
    return out


#: block flags of DeciLM layers that are not Llama's attention or FF
_SPECIAL_BLOCKS = ("no_op", "replace_with_linear")


def _plain_block(block: Any) -> tuple[int, float] | None:
    """``(n_heads_in_group, ffn_mult)`` of a DeciLM block that is Llama's attention and FF,
    else ``None``."""
    attention = block.get("attention") if isinstance(block, dict) else None
    ffn = block.get("ffn") if isinstance(block, dict) else None
    if not isinstance(attention, dict) or not isinstance(ffn, dict):
        return None
    if any(part.get(flag) for part in (attention, ffn) for flag in _SPECIAL_BLOCKS):
        return None
    group, mult = attention.get("n_heads_in_group"), ffn.get("ffn_mult")
    if not isinstance(group, int) or group < 1 or not isinstance(mult, (int, float)):
        return None
    return group, float(mult)


def export_config(directory: str | Path) -> Any:
    """The transformers config of an export (either layout) or model directory: a DeciLM
    ``config.json`` as its family's own config (:func:`source_config`), others as
    ``AutoConfig`` reads them. Never runs remote code."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportFormatError(f"'{path}' is unreadable or not JSON ({exc}); re-export") from exc
    if not isinstance(raw, dict) or not is_decilm(raw):
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    data = source_config(raw)
    spec_for(data["model_type"])  # names an unsupported family in one line
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def check_decilm_export(
    config: Any, spec: ArchSpec, budget: str, ratio: float, multiple_of: int
) -> None:
    """Refuse (``UsageError``, one line naming what works) a ``--format decilm`` export of
    ``config`` before any weights load: a family without Llama's graph, or a layer width that
    DeciLM's ``ffn_mult`` cannot state exactly."""
    problem = llama_graph_problem(config)
    if problem is not None:
        raise UsageError(
            f"--format decilm needs Llama's graph, but {problem}; use --format hf (the default)"
        )
    n_layers, d_ff, m = config.num_hidden_layers, spec.d_ff(config), DECILM_MULTIPLE

    def misfits(multiple_of: int) -> list[int]:
        sizes = layer_sizes(budget, n_layers, d_ff, ratio, multiple_of)
        return sorted({k for k in sizes if k % m})

    bad = misfits(multiple_of)
    if not bad:
        return
    if multiple_of % m and d_ff >= m and not misfits(m):
        fix = f"use --multiple-of {m}"
    else:
        fix = f"use --format hf (no --multiple-of gives d_ff {d_ff} at ratio {ratio} such widths)"
    raise UsageError(
        f"--format decilm stores each layer's width as an ffn_mult that vLLM and llama.cpp round "
        f"up to a multiple of {m} neurons, so widths {bad} would load with other shapes; {fix}"
    )
