"""`--format decilm` exports are what engines that read DeciLM expect: llama.cpp's own converter,
unmodified (its command line, no griffin code in the process), converts one, and llama.cpp then
computes the same logits as transformers on the export; `griffin gguf` on it does too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (a test dependency: make test installs it)
import numpy as np
import pytest
from test_gguf import llama_cpp_logits, transformers_logits
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from griffin_export import export
from griffin_export.engines.llamacpp import converter_dir, read_gguf_widths, write_gguf
from griffin_export.evaluation.corpora import load_corpus
from griffin_export.formats.manifest import read_manifest

from tiny import save_tiny

PROMPT = "the quick brown fox jumps over the lazy dog. " * 8


def llama2_style_tokenizer() -> PreTrainedTokenizerFast:
    """A small Llama-2-style tokenizer (BPE with byte fallback, SentencePiece-style spaces):
    the kind llama.cpp's DeciLM conversion reads for a vocabulary that is not Llama 3's."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "▁th", "▁the", "he", "er", "▁a"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("e", "r"), ("▁", "a")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def decilm_export(tmp_path: Path) -> Path:
    """A per-layer DeciLM export of a tiny Llama (d_ff 768): widths [768, 512, 256, 256, 768]."""
    tokenizer = llama2_style_tokenizer()
    source = save_tiny(
        "llama",
        tmp_path / "src",
        vocab_size=len(tokenizer),
        intermediate_size=768,
        num_hidden_layers=5,
        head_dim=None,
    )
    tokenizer.save_pretrained(source)
    out = tmp_path / "export"
    export(
        str(source),
        [PROMPT],
        0.5,
        out=out,
        budget="protect",
        multiple_of=256,
        checkpoint_format="decilm",
    )
    return out


def test_unmodified_converter_converts_a_decilm_export(decilm_export: Path, tmp_path: Path) -> None:
    """llama.cpp's converter, run from its own command line, reads the DeciLM config (per-layer
    widths from ffn_mult, heads from n_heads_in_group) and llama.cpp's logits equal
    transformers' on the export. Catches an ffn_mult that rounds to another width, a wrong
    n_heads_in_group, tensor names the converter does not map."""
    widths = read_manifest(decilm_export).k_per_layer
    assert len(set(widths)) > 1, widths
    tool = converter_dir()
    out = tmp_path / "stock.gguf"
    env = dict(os.environ, PYTHONPATH=str(tool))
    command = [sys.executable, str(tool / "convert_hf_to_gguf.py"), str(decilm_export)]
    done = subprocess.run(
        [*command, "--outfile", str(out), "--outtype", "f32"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_gguf_widths(out) == ("deci", widths)
    ids = list(range(3, 40))
    want = transformers_logits(decilm_export, ids)
    got = llama_cpp_logits(out, ids)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    ours = write_gguf(decilm_export, tmp_path / "ours.gguf", "f32")
    assert ours.architecture == "deci" and ours.ff_widths == widths
    np.testing.assert_allclose(
        llama_cpp_logits(ours.path, ids), want, atol=2e-4 * np.abs(want).max(), rtol=0
    )


@pytest.mark.slow
def test_embedded_model_decilm_export_with_gguf(tmp_path: Path) -> None:
    """SmolLM2, ``--budget protect --multiple-of 256 --format decilm --gguf f32`` in one export:
    the GGUF inside is 'deci' with the export's widths and llama.cpp's logits on real text equal
    transformers' to 1e-5 of their range. Catches the DeciLM layout reaching the converter's
    Llama-3/Llama-2-only tokenizer step (SmolLM2's BPE would fail there) or widths lost between
    ffn_mult and the GGUF."""
    out = tmp_path / "export"
    export(
        "smollm2-135m",
        [PROMPT],
        0.5,
        out=out,
        budget="protect",
        multiple_of=256,
        checkpoint_format="decilm",
        gguf="f32",
    )
    gguf = out / "model-f32.gguf"
    assert read_gguf_widths(gguf) == ("deci", read_manifest(out).k_per_layer)
    ids = AutoTokenizer.from_pretrained(out)(load_corpus("wiki-summaries").text[:2000])[
        "input_ids"
    ][:128]
    want = transformers_logits(out, ids)
    got = llama_cpp_logits(gguf, ids)
    assert np.abs(got - want).max() <= 1e-5 * (want.max() - want.min())
