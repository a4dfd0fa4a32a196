"""GGUFs of griffin exports run in llama.cpp: every check runs the file in llama.cpp itself
(``llama-cpp-python``) and compares its logits with transformers on the same export."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp  # a test dependency: make test installs it (Makefile)
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, load_pretrained
from griffin_export.engines import llamacpp as llamacpp_module
from griffin_export.engines.llamacpp import CONVERTER_ENV, read_gguf_widths, write_gguf
from griffin_export.errors import ConverterError, UnsupportedArchitectureError, UsageError
from griffin_export.evaluation.corpora import load_corpus
from griffin_export.formats.manifest import read_manifest
from griffin_export.formats.verify import verify_export
from griffin_export.storage.sources import ensure_converted_gguf, ensure_embedded

from tiny import save_sentencepiece_tokenizer, save_tiny

#: a SmolLM2-sized vocabulary: llama.cpp's converter only takes tokenizers it recognises, so the
#: tiny models borrow the embedded SmolLM2's (a GPT-2-style BPE it knows as "smollm").
VOCAB = 49152
#: the SentencePiece tokenizer trained for the tiny models (:func:`spm_tokenizer`): its size.
SPM_VOCAB = 512
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6
#: Families whose uniform exports llama.cpp runs like transformers: model_type -> how its case
#: runs. The tokenizer the tiny model borrows: ``spm``, a SentencePiece model (the family's
#: converter reads ``tokenizer.model``), ``bpe``, SmolLM2's GPT-2-style BPE (the converter
#: takes only a BPE whose pre-tokenizer it recognises; transformers' conversion of a
#: SentencePiece model is not one), or ``glm``, that BPE with the special tokens GLM's converter
#: looks up (:data:`GLM_TOKENS`). ``gelu``: llama.cpp computes the FF through its GELU, and
#: its logits differ from transformers' by 1.1e-4 to 2.9e-4 of the largest (measured on these
#: tiny models; ggml's CPU GELU looks its input up in an f16 table), where every other family
#: matches to 4e-6 (Gemma's GeGLU too); a wrong tensor, width or config field moves them by far
#: more. ``slow``: the same converter class and llama.cpp graph as a family checked before it
#: (Mistral, InternLM 3, IQuestCoder load as Llama; GPT-SW3 is GPT-2; OLMo 3 is OLMo 2's graph
#: with sliding layers) or a BPE case, which costs ~10 s against ~5 s (SmolLM2's 49k tokens):
#: run with ``-m slow`` (CI runs them too). GLM-4, Ministral 3 and HunYuan-dense convert through
#: ``_llamacpp_convert``'s placeholders for the ``gguf`` names the converter's DeepSeek and
#: HunYuan modules reference and its bundled ``gguf`` lacks (they failed to import before).
FAMILIES: dict[str, str] = {
    "llama": "spm",
    "mistral": "spm slow",
    "qwen2": "spm",
    "qwen3": "spm",
    "gemma": "spm",
    "gemma2": "spm gelu",
    "gemma3_text": "spm gelu",
    "granite": "spm",
    "ernie4_5": "spm",
    "internlm3": "spm slow",
    "iquestcoder": "spm slow",
    "smollm3": "spm",
    "apertus": "spm",
    "arcee": "spm",
    "nemotron": "spm",
    "phi3": "spm",
    "olmo": "bpe slow",
    "olmo2": "bpe",
    "olmo3": "bpe slow",
    "stablelm": "bpe",
    "cohere": "bpe",
    "cohere2": "bpe",
    "exaone4": "bpe slow",
    "seed_oss": "bpe slow",
    "jais2": "bpe slow",
    "starcoder2": "bpe gelu",
    "gpt2": "bpe gelu",
    "gpt-sw3": "bpe gelu slow",
    "gpt_bigcode": "bpe gelu",
    "gpt_neox": "bpe gelu",
    "phi": "bpe gelu",
    "ministral3": "spm",
    "glm4": "glm slow",
    "hunyuan_v1_dense": "bpe slow",
}
#: The added tokens GLM's converter reads (its BOS, EOT, UNK and EOM), appended to SmolLM2's BPE.
GLM_TOKENS = ("<|endoftext|>", "[gMASK]", "<|user|>", "<|observation|>")
#: Tiny-config fields set as released checkpoints of the family have them, because llama.cpp
#: does not read them from the config: it scales Gemma 2/3 queries by 1/sqrt(head_dim), not by
#: query_pre_attn_scalar (256 against head_dim 8 moved 92-96% of the tiny logits; released
#: Gemma 2/3 have it equal to head_dim but in the 27B models, which llama.cpp recognises by
#: size), and the converter states Phi-2's KV heads as its heads (as Phi-1, 1.5 and 2 have).
FAMILY_OVERRIDES: dict[str, dict[str, int]] = {
    "gemma2": {"query_pre_attn_scalar": 8},
    "gemma3_text": {"query_pre_attn_scalar": 8},
    "phi": {"num_key_value_heads": 4},
    "glm4": {"vocab_size": VOCAB + len(GLM_TOKENS)},
}


#: tokenizer kind (:data:`FAMILIES`) -> the fixture that makes it
TOKENIZER_FIXTURES = {"spm": "spm_tokenizer", "bpe": "smol_tokenizer", "glm": "glm_tokenizer"}


@pytest.fixture(scope="module")
def smol_tokenizer() -> Path:
    """The embedded SmolLM2's tokenizer files (its cached transformers conversion)."""
    return ensure_embedded("smollm2-135m")


@pytest.fixture(scope="module")
def glm_tokenizer(smol_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer with :data:`GLM_TOKENS` added (ids from :data:`VOCAB` on)."""
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("glm-tokenizer")
    tokenizer = Tokenizer.from_file(str(smol_tokenizer / "tokenizer.json"))
    tokenizer.add_special_tokens(list(GLM_TOKENS))
    tokenizer.save(str(directory / "tokenizer.json"))
    shutil.copy(smol_tokenizer / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece tokenizer of :data:`SPM_VOCAB` pieces trained on 20k characters of
    ``wiki-summaries`` (well under a second)."""
    text = load_corpus("wiki-summaries").text[:20000]
    return save_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"), text, SPM_VOCAB)


def _tiny_source(tmp_path: Path, model_type: str, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny random ``model_type`` with the tokenizer files of ``tokenizer_dir`` (SmolLM2's
    BPE or the SentencePiece model; the vocabulary sized to match)."""
    spm = (tokenizer_dir / "tokenizer.model").is_file()
    overrides.setdefault("vocab_size", SPM_VOCAB if spm else VOCAB)
    source = save_tiny(model_type, tmp_path / f"src-{model_type}", **overrides)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / stale).unlink(missing_ok=True)
    for name in ("tokenizer.model" if spm else "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, source / name)
    return source


def _ids(n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SPM_VOCAB, (n,), generator=g).tolist()


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    """Logits of every position, from llama.cpp (f32 KV cache, one sequence, no BOS added)."""
    f32 = 0  # GGML_TYPE_F32
    model = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=max(64, len(ids)),
        n_batch=max(64, len(ids)),
        n_threads=2,
        logits_all=True,
        verbose=False,
        type_k=f32,
        type_v=f32,
    )
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float64)
    finally:
        model.close()


def transformers_logits(export_dir: Path, ids: list[int]) -> np.ndarray:
    model = load_pretrained(export_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits.double().numpy()


def _export(source: Path, out: Path, **kwargs) -> Path:
    export(str(source), [PROMPT], kwargs.pop("ratio", 0.5), out=out, **kwargs)
    return out


@pytest.mark.parametrize(
    "model_type",
    [
        pytest.param(t, marks=[pytest.mark.slow] if "slow" in how else [])
        for t, how in FAMILIES.items()
    ],
)
def test_uniform_export_runs_in_llama_cpp_like_transformers(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A uniform keep-0.5 export of each family, f32 GGUF: llama.cpp's logits equal
    transformers' on the same export (2e-4 of the largest logit; 1e-3 for GELU families).
    Catches a GGUF converted from the wrong directory (the full model), tensors at the wrong
    width, a mangled tokenizer/config hand-off; and, through the transformers-5 shims of
    ``_llamacpp_convert``: a converter reading v4 config names v5 no longer writes (GPT-2's
    n_ctx, GPT-NeoX's and Cohere 2's rotary_pct: KeyError), or stating 4 * hidden as the FF
    width of a pruned GPT-2 / GPT-BigCode / Phi (llama.cpp refuses the tensors)."""
    how = FAMILIES[model_type].split()
    tokenizer_dir = request.getfixturevalue(TOKENIZER_FIXTURES[how[0]])
    overrides = FAMILY_OVERRIDES.get(model_type, {})
    source = _tiny_source(tmp_path, model_type, tokenizer_dir, **overrides)
    out = _export(source, tmp_path / "export")
    result = write_gguf(out, tmp_path / "m.gguf", "f32")
    k = read_manifest(out).k_per_layer
    assert result.ff_widths == k
    ids = _ids()
    got, want = llama_cpp_logits(result.path, ids), transformers_logits(out, ids)
    bound = 1e-3 if "gelu" in how else 2e-4
    np.testing.assert_allclose(got, want, atol=bound * np.abs(want).max(), rtol=0)


def test_per_layer_llama_export_is_deci_with_each_layer_width(
    spm_tokenizer: Path, tmp_path: Path
) -> None:
    """A per-layer (protect) Llama export becomes llama.cpp's 'deci' with every layer's own
    width, and llama.cpp's logits equal transformers'. Catches writing one width for all layers
    (llama.cpp then refuses the tensors or computes another model), the converter's 256-rounding
    of DeciLM widths, heads mis-stated per layer."""
    source = _tiny_source(tmp_path, "llama", spm_tokenizer, num_hidden_layers=5)
    out = _export(source, tmp_path / "export", budget="protect", ratio=0.6)
    k = read_manifest(out).k_per_layer
    assert len(set(k)) > 1, k
    result = write_gguf(out, tmp_path / "m.gguf", "f32")
    assert result.architecture == "deci"
    assert read_gguf_widths(result.path) == ("deci", k)
    ids = _ids()
    got, want = llama_cpp_logits(result.path, ids), transformers_logits(out, ids)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_q8_0_agrees_on_the_top_token(spm_tokenizer: Path, tmp_path: Path) -> None:
    """q8_0 (llama.cpp's 8-bit blocks) of a per-layer export: the top-1 token agrees with
    transformers at >= 90% of positions and logits stay within 5% of their range. Catches a
    q8_0 file that is really another model or mis-scaled blocks (any gross error)."""
    source = _tiny_source(
        tmp_path, "llama", spm_tokenizer, hidden_size=64, head_dim=16, num_hidden_layers=4
    )
    out = _export(source, tmp_path / "export", budget="protect", ratio=0.6)
    result = write_gguf(out, None, "q8_0")
    assert result.path == tmp_path / "export-q8_0.gguf"
    ids = _ids(48)
    got, want = llama_cpp_logits(result.path, ids), transformers_logits(out, ids)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert agree >= 0.9, agree
    assert np.abs(got - want).max() <= 0.05 * (want.max() - want.min())


def test_q8_0_warns_exactly_when_ff_rows_stay_unquantised(
    spm_tokenizer: Path, tmp_path: Path
) -> None:
    """q8_0 packs rows in blocks of 32: an export whose FF width is not a multiple of 32 keeps
    its down projections unquantised (read from the GGUF's own tensor types) and griffin warns
    naming --multiple-of 32; at a multiple of 32 every down projection is Q8_0 and nothing is
    said. Catches a warning that is always or never given, or one that names the wrong fix."""
    from gguf import GGUFReader

    source = _tiny_source(tmp_path, "llama", spm_tokenizer, intermediate_size=96)
    types = {}
    for multiple in (1, 32):
        out = _export(source, tmp_path / f"m{multiple}", ratio=0.6, multiple_of=multiple)
        result = write_gguf(out, tmp_path / f"m{multiple}.gguf", "q8_0")
        down = {t.tensor_type.name for t in GGUFReader(result.path).tensors if "ffn_down" in t.name}
        types[multiple] = (down, result.warnings, read_manifest(out).k_per_layer[0])
    (odd_types, odd_warnings, odd_k), (even_types, even_warnings, even_k) = types[1], types[32]
    assert odd_k % 32 and even_k % 32 == 0, (odd_k, even_k)
    assert "Q8_0" not in odd_types and len(odd_warnings) == 1
    assert "--multiple-of 32" in odd_warnings[0]
    assert even_types == {"Q8_0"} and even_warnings == []


def test_per_layer_export_of_another_family_is_refused(spm_tokenizer: Path, tmp_path: Path) -> None:
    """Per-layer widths of a family without Llama's graph (Qwen2: q/k/v biases) are refused
    naming --budget uniform, by griffin gguf and by export --gguf before anything is written.
    Catches writing a 'deci' file for a graph llama.cpp would run differently."""
    source = _tiny_source(tmp_path, "qwen2", spm_tokenizer)
    out = _export(source, tmp_path / "export", budget="protect", ratio=0.8)
    with pytest.raises(UsageError, match="--budget uniform"):
        write_gguf(out, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))
    with pytest.raises(UsageError, match="--budget uniform"):
        export(str(source), [PROMPT], 0.8, out=tmp_path / "e2", budget="protect", gguf="f16")
    assert not (tmp_path / "e2").exists()


def test_export_writes_the_gguf_inside_and_verifies(spm_tokenizer: Path, tmp_path: Path) -> None:
    """``export(gguf=...)`` puts model-<type>.gguf in the export, hashed in the manifest (verify
    passes, and fails once the GGUF is altered), and it runs like the export's safetensors.
    Catches a GGUF written outside the atomic directory or left out of the manifest."""
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    out = tmp_path / "export"
    result = export(str(source), [PROMPT], 0.5, out=out, gguf="f32")
    gguf = out / "model-f32.gguf"
    assert result.gguf is not None and result.gguf["path"] == str(gguf)
    assert "model-f32.gguf" in read_manifest(out).files
    assert verify_export(out).ok
    ids = _ids()
    np.testing.assert_allclose(
        llama_cpp_logits(gguf, ids),
        transformers_logits(out, ids),
        atol=2e-4 * np.abs(transformers_logits(out, ids)).max(),
        rtol=0,
    )
    with gguf.open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    assert not verify_export(out).ok


def test_missing_converter_refused_before_anything_loads(
    spm_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without llama.cpp's converter both entry points refuse in one line with the install
    command, and export writes nothing. Catches a traceback deep in a subprocess, or an export
    that is written and then fails."""
    monkeypatch.setenv(CONVERTER_ENV, str(tmp_path / "nowhere"))
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    with pytest.raises(UsageError, match="pip install --no-deps --target") as caught:
        export(str(source), [PROMPT], 0.5, out=tmp_path / "e", gguf="q8_0")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "e").exists()


def test_converter_failure_is_one_line_and_leaves_nothing(
    spm_tokenizer: Path, tmp_path: Path
) -> None:
    """A checkpoint llama.cpp's converter cannot take (an architecture it does not know)
    raises one line carrying the converter's reason, and no file or temporary is left. Catches
    swallowing the child's exit code or leaving a partial .gguf."""
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    out = _export(source, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConverterError, match="NoSuchModelForCausalLM") as caught:
        write_gguf(out, tmp_path / "m.gguf", "f16")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "src-llama"]


def test_family_the_converter_cannot_convert_is_refused_first(
    spm_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family of LLAMA_CPP_REFUSED (here Llama, given a row for the test: the table's own rows
    are checked against llama.cpp in tests/test_gguf_moe.py) is refused in one line naming it,
    its reason, and that the export runs in transformers, before the converter runs (it is not
    even needed), and ``export(gguf=...)`` leaves no directory. Catches running the converter
    anyway (here the missing-converter error first) or leaving a partial export."""
    monkeypatch.setattr(llamacpp_module, "LLAMA_CPP_REFUSED", {"llama": "a reason llama.cpp gives"})
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    with pytest.raises(UnsupportedArchitectureError, match="runs in transformers") as caught:
        export(str(source), [PROMPT], 0.5, out=tmp_path / "e", gguf="f16")
    assert "'llama'" in str(caught.value) and "\n" not in str(caught.value)
    assert "a reason llama.cpp gives" in str(caught.value)
    assert not (tmp_path / "e").exists()
    out = _export(source, tmp_path / "export")
    monkeypatch.setenv(CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'llama'"):
        write_gguf(out, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


def test_cli_gguf_json_and_refusals(spm_tokenizer: Path, tmp_path: Path) -> None:
    """``griffin gguf DIR --outtype f16 --json`` reports what it wrote; an existing --out is
    refused without --force; an unknown --outtype is refused at parse time; a path that is not an
    export is one usage line. Catches a CLI that overwrites silently, accepts types the converter
    would reject late, or reports a missing directory as a broken export."""
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    out = _export(source, tmp_path / "export")
    runner = CliRunner()
    target = tmp_path / "x.gguf"
    done = runner.invoke(app, ["gguf", str(out), "--out", str(target), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["outtype"] == "f16" and report["architecture"] == "llama"
    assert report["file_bytes"] == target.stat().st_size
    again = runner.invoke(app, ["gguf", str(out), "--out", str(target)])
    assert again.exit_code != 0 and "--force" in again.output
    bad = runner.invoke(app, ["gguf", str(out), "--outtype", "q2_k"])
    assert bad.exit_code == 2 and "q2_k" in bad.output
    missing = runner.invoke(app, ["gguf", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not an export directory" in missing.output


# -- the embedded SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["uniform", "protect"])
def test_embedded_model_ggufs_match_transformers(budget: str, tmp_path: Path) -> None:
    """SmolLM2 at keep 0.5 (uniform: 'llama'; protect: 'deci') on 128 tokens of real text:
    f32 logits through llama.cpp equal transformers' to 1e-5 of their range (measured ~1e-6);
    q8_0 agrees on the top token at >= 90% of positions (measured 94%) and stays within 5% of
    the range (measured 3.0-3.4%). Catches anything the tiny models miss at real size (tied
    embeddings, GQA heads, rope base, the real tokenizer hand-off)."""
    out = tmp_path / "export"
    export("smollm2-135m", [PROMPT], 0.5, out=out, budget=budget, gguf="f32")
    gguf = out / "model-f32.gguf"
    arch, widths = read_gguf_widths(gguf)
    assert arch == ("llama" if budget == "uniform" else "deci")
    assert widths == read_manifest(out).k_per_layer
    text = load_corpus("wiki-summaries").text[:2000]
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"][:128]
    want = transformers_logits(out, ids)
    span = want.max() - want.min()
    assert np.abs(llama_cpp_logits(gguf, ids) - want).max() <= 1e-5 * span
    q8 = write_gguf(out, tmp_path / "q8.gguf", "q8_0")
    got8 = llama_cpp_logits(q8.path, ids)
    assert float((got8.argmax(-1) == want.argmax(-1)).mean()) >= 0.9
    assert np.abs(got8 - want).max() <= 0.05 * span


# -- the converter's child process: time limit, streamed output, last lines in the error -------

#: A stand-in for llama.cpp's converter: the driver imports ``gguf`` first, so a ``gguf``
#: package that writes 30 log lines and two redraws of a progress bar to stderr, starts the
#: output file, then hangs (``sleep``), kills itself with a real-time signal (``signal``) or
#: gives up with an ERROR line (``fail``).
FAKE_GGUF = """
import os, sys, time
for i in range(30):
    print(f"INFO:fake:line {i}", file=sys.stderr, flush=True)
sys.stderr.write("Writing:  10%|#         | 1/10\\r")
sys.stderr.write("Writing:  40%|####      | 4/10\\r")
sys.stderr.flush()
with open(sys.argv[2], "wb") as partial:
    partial.write(b"GGUF partial")
if os.environ["GRIFFIN_FAKE_CONVERTER"] == "sleep":
    print("INFO:fake:about to hang", file=sys.stderr, flush=True)
    time.sleep(600)
if os.environ["GRIFFIN_FAKE_CONVERTER"] == "signal":
    import signal
    os.kill(os.getpid(), signal.SIGRTMIN + 6)  # a real-time signal: Python has no name for it
print("ERROR:fake:the fake converter gives up", file=sys.stderr, flush=True)
sys.exit(3)
"""
#: What the fake writes, as lines: a progress bar's redraws end at a carriage return.
FAKE_LINES = [f"INFO:fake:line {i}" for i in range(30)] + [
    "Writing:  10%|#         | 1/10",
    "Writing:  40%|####      | 4/10",
]


@pytest.fixture
def fake_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point $GRIFFIN_LLAMA_CONVERTER at the fake; the returned function picks its mode."""
    directory = tmp_path / "fake-converter"
    (directory / "gguf").mkdir(parents=True)
    (directory / "convert_hf_to_gguf.py").write_text("")
    (directory / "gguf" / "__init__.py").write_text(FAKE_GGUF)
    monkeypatch.setenv(CONVERTER_ENV, str(directory))
    return lambda mode: monkeypatch.setenv("GRIFFIN_FAKE_CONVERTER", mode)


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama export (its tokenizer does not matter to the fake converter)."""
    root = tmp_path_factory.mktemp("plain")
    return _export(save_tiny("llama", root / "src"), root / "export")


def test_converter_past_its_time_limit_is_stopped_and_leaves_nothing(
    plain_export: Path, fake_converter: Callable[[str], None], tmp_path: Path
) -> None:
    """A converter that hangs after writing part of the file: stopped at ``timeout``, the
    partial file removed, one-line ConverterError naming the limit, --timeout and the last
    lines it wrote; every line reached ``on_line`` as written (the bar's two redraws apart),
    the percentages reached ``progress``, and sys.stderr was never swapped. Catches a child
    left running (the call never returns), a stale temporary file, an error without the
    converter's last words, or output buffered until the end."""
    fake_converter("sleep")
    lines: list[str] = []
    streams: set[int] = set()
    percents: list[int] = []

    def on_line(line: str) -> None:
        lines.append(line)
        streams.add(id(sys.stderr))

    before = sorted(p.name for p in tmp_path.iterdir())
    stderr = sys.stderr
    with pytest.raises(ConverterError) as caught:
        write_gguf(
            plain_export,
            tmp_path / "m.gguf",
            "f16",
            progress=lambda stage, done, total: percents.append(done),
            on_line=on_line,
            timeout=2,
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("llama.cpp's converter timed out after 2 s and was stopped")
    assert "raise the limit with --timeout SECONDS" in message
    expected = [*FAKE_LINES, "INFO:fake:about to hang"]
    assert lines == expected
    assert streams == {id(stderr)}
    tail = [*FAKE_LINES[:-2], FAKE_LINES[-1], "INFO:fake:about to hang"][-20:]
    assert caught.value.output == tail
    assert message.endswith("its last output: " + " | ".join(tail))
    assert percents[:3] == [0, 10, 40] and 100 not in percents
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_converter_failure_carries_its_last_lines(
    plain_export: Path, fake_converter: Callable[[str], None], tmp_path: Path
) -> None:
    """A converter that fails: ConverterError with its exit code, its ERROR line as the
    reason, and its last 20 lines (one progress-bar line, the latest) in one line; nothing is
    left. Catches losing the converter's output, keeping its first lines instead of its
    last, or one tail entry per bar redraw crowding the reason out."""
    fake_converter("fail")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConverterError) as caught:
        write_gguf(plain_export, tmp_path / "m.gguf", "f16")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "llama.cpp's converter failed (exit code 3): the fake converter gives up;"
    )
    tail = [*FAKE_LINES[:-2], FAKE_LINES[-1], "ERROR:fake:the fake converter gives up"][-20:]
    assert caught.value.output == tail and tail[0] == "INFO:fake:line 12"
    assert " | ".join(tail) in message and "line 11 " not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(not hasattr(signal, "SIGRTMIN"), reason="no real-time signals here")
def test_converter_killed_by_an_unnamed_signal_says_its_number(
    plain_export: Path, fake_converter: Callable[[str], None], tmp_path: Path
) -> None:
    """A converter killed by a real-time signal (which signal.Signals cannot name): one
    ConverterError line "killed by signal N" with its last output, nothing left. Catches
    ``signal.Signals(-code)`` raising ValueError in place of the converter's error."""
    fake_converter("signal")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConverterError) as caught:
        write_gguf(plain_export, tmp_path / "m.gguf", "f16")
    message = str(caught.value)
    assert "\n" not in message
    assert f"failed (killed by signal {int(signal.SIGRTMIN) + 6})" in message
    assert "INFO:fake:line 29" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("timeout", [0, -5, float("nan"), float("inf"), "60"])
def test_a_bad_timeout_is_refused_before_the_converter_runs(
    plain_export: Path, timeout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--timeout that is not a positive finite number: UsageError naming it, before anything
    runs (no converter is installed here, which would be the error otherwise). Catches a
    zero or infinite limit passed on to the timer."""
    monkeypatch.setenv(CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=r"--timeout must be a positive number of seconds"):
        write_gguf(plain_export, tmp_path / "m.gguf", "f16", timeout=timeout)
    with pytest.raises(UsageError, match=r"--timeout must be a positive number of seconds"):
        export(
            str(plain_export), [PROMPT], 0.5, out=tmp_path / "e", gguf="f16", gguf_timeout=timeout
        )
    assert not list(tmp_path.iterdir())


def test_export_gguf_timeout_leaves_no_export(
    plain_export: Path, fake_converter: Callable[[str], None], tmp_path: Path
) -> None:
    """``griffin export --gguf f16 --timeout 2`` with a hanging converter: exit 1, one error
    line naming --timeout, no export directory; ``griffin gguf --timeout 2`` the same, no
    file; --timeout without --gguf is a usage error. Catches the CLI dropping --timeout (the
    default hour would pass) or the export keeping its temporary directory."""
    fake_converter("sleep")
    runner = CliRunner()
    source = plain_export.parent / "src"
    out = tmp_path / "e"
    args = ["export", "--model", str(source), "--prompt-text", PROMPT, "--out", str(out)]
    result = runner.invoke(app, [*args, "--gguf", "f16", "--timeout", "2"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "timed out after 2 s" in errors[0] and "--timeout SECONDS" in errors[0]
    result = runner.invoke(
        app, ["gguf", str(plain_export), "-o", str(tmp_path / "m.gguf"), "--timeout", "2"]
    )
    assert result.exit_code == 1 and "timed out after 2 s" in result.output, result.output
    result = runner.invoke(app, [*args, "--timeout", "2"])
    assert result.exit_code == 2 and "--timeout limits the --gguf conversion" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-converter"]


def test_a_gguf_source_converts_with_progress_and_no_stream_swapped(
    spm_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.gguf`` source is dequantised once (the real transformers path) and reports its
    tensors as ``convert`` progress, while ``sys.stderr`` stays the process's own. Catches the
    old ``redirect_stderr`` (every warning of the process hidden meanwhile, not thread-safe) and
    a bar that reports nothing; the converted model must compute what the GGUF's source did."""
    import gguf as gguf_package

    monkeypatch.setenv("GRIFFIN_CACHE", str(tmp_path / "cache"))
    source = _tiny_source(tmp_path, "llama", spm_tokenizer)
    path = tmp_path / "tiny.gguf"
    write_gguf(source, path, "f32")
    stderr = sys.stderr
    seen: list[tuple[str, int, int, bool]] = []
    target = ensure_converted_gguf(
        path,
        progress=lambda stage, done, total: seen.append((stage, done, total, sys.stderr is stderr)),
    )
    n_tensors = len(gguf_package.GGUFReader(path).tensors)
    steps = [(done, total) for stage, done, total, _ in seen if stage == "convert" and total > 1]
    assert steps == [(i, n_tensors) for i in range(n_tensors)]
    assert all(same for *_, same in seen)
    ids = torch.tensor([_ids()])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
