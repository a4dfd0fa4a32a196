"""The DeciLM / Nemotron-NAS layout of an export.

``griffin export --format decilm`` writes the weights of an export (the ``hf`` layout,
:mod:`griffin_export.formats.layout`) with a DeciLM / Nemotron-NAS ``config.json`` instead
(:func:`decilm_config`), for families with Llama's graph
(:func:`~griffin_export.core.architectures.llama_graph_problem`): ``architectures``
``["DeciLMForCausalLM"]``, ``model_type`` ``nemotron-nas`` and one ``block_configs`` entry per
layer whose ``ffn.ffn_mult`` gives the layer's width. vLLM's ``DeciLMForCausalLM`` and
llama.cpp's converter turn ``ffn_mult`` into a width as :func:`ffn_mult_width` does
(``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256), so only widths that are
multiples of 256 can be stored; :func:`ffn_mult_for` picks an ``ffn_mult`` that gives back the
exact width, and anything else is refused before a file is written. The source's
``model_type`` and ``architectures`` stay in the ``griffin`` block, so
:func:`~griffin_export.formats.layout.export_config` reads such a directory back as the
family's own config with per-layer widths (:func:`source_config`; transformers has no DeciLM
class without remote code, which griffin never runs). Gemma 3n, for comparison, puts a list in
``intermediate_size`` (its own config class allows it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from griffin_export.core.architectures import ArchSpec, llama_graph_problem
from griffin_export.core.budgets import layer_sizes
from griffin_export.errors import ExportFormatError, UsageError
from griffin_export.formats.manifest import SIZES_KEY

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
