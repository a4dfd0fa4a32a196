"""Model sources: hub ids through the local Hugging Face cache, tokenizer files copied as the
source has them, BOS-aware corpora, float16 overflow refused, exports opened beside their
original without holding shared tensors twice."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.core.budgets import layer_sizes
from griffin_export.errors import ModelLoadError, UsageError
from griffin_export.evaluation.corpora import bos_token
from griffin_export.evaluation.ppl import evaluate, perplexity
from griffin_export.evaluation.protocols import Setting, make_windows
from griffin_export.formats.exports import open_export, open_export_with_original
from griffin_export.storage.loading import load_model, load_tokenizer
from griffin_export.storage.sources import TOKENIZER_FILES, resolve_source, save_tokenizer

from tiny import D_FF, char_tokenizer, random_ids, save_tiny, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (huggingface_hub reads both at import time, so
    its constants are patched rather than the environment)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_uncached_hub_id_offline_fails_fast_with_the_fix(hub_cache: Path) -> None:
    """Catches handing the id to transformers (which retries for ~20 s) or a message that
    does not say the model is missing from the cache."""
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        resolve_source("someone/not-cached")
    assert time.perf_counter() - started < 2.0
    message = str(info.value)
    assert "someone/not-cached" in message and "download" in message and "\n" not in message


def test_cached_hub_snapshot_resolves_and_exports_offline(hub_cache: Path, tmp_path: Path) -> None:
    """A snapshot laid out by hand as huggingface_hub stores it. Catches resolving a hub id
    to anything but the cached snapshot (e.g. leaving it to from_pretrained online), and
    loading it as a different model (logits compared with the model that was saved)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--someone--tiny-llama"
    snapshot = save_tiny("llama", repo / "snapshots" / revision, seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")

    source = resolve_source("someone/tiny-llama")
    assert source.kind == "hub" and source.directory == snapshot
    loaded = load_model(source)
    ids = random_ids(12)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_model("llama", seed=3)(ids).logits)
    result = export("someone/tiny-llama", ["Words of a prompt."], 0.5, out=tmp_path / "exp")
    manifest = json.loads((result.out_dir / "griffin.json").read_text(encoding="utf-8"))
    assert manifest["source"]["model"] == "someone/tiny-llama"
    assert manifest["source"]["kind"] == "hub"


def test_export_copies_the_tokenizer_files_byte_for_byte(tmp_path: Path) -> None:
    """Catches writing the tokenizer with save_pretrained from the loaded object, which
    records load options such as ``local_files_only`` in tokenizer_config.json."""
    src = save_tiny("llama", tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 77  # a value only the source has
    (src / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    out = export(str(src), ["Words of a prompt."], 0.5, out=tmp_path / "exp").out_dir
    present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    assert "tokenizer_config.json" in present and "tokenizer.json" in present
    for name in present:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_saved_tokenizer_carries_no_load_options(tmp_path: Path) -> None:
    """The GGUF path saves a loaded tokenizer. Catches a plain save_pretrained, which writes
    the ``local_files_only`` it was loaded with into tokenizer_config.json."""
    from transformers import AutoTokenizer

    char_tokenizer().save_pretrained(tmp_path / "a")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    save_tokenizer(loaded, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "local_files_only" not in config and "is_local" not in config
    assert config["bos_token"] == "<s>"  # the tokenizer itself is kept


def bos_tokenizer():  # type: ignore[no-untyped-def]
    """The char tokenizer, but adding ``<s>`` (id 1) in front of every text, as Gemma's and
    Llama's tokenizers do."""
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def test_bos_is_detected_only_where_the_tokenizer_adds_it() -> None:
    """Catches keying on ``bos_token_id`` alone: both tokenizers have one, only one adds it."""
    assert bos_tokenizer()("ab")["input_ids"][0] == 1
    assert bos_token(bos_tokenizer()) == 1
    assert bos_token(char_tokenizer()) is None


@pytest.mark.parametrize("stride", [None, 5])
def test_windows_with_bos_score_every_stream_token_once(stride: int | None) -> None:
    """Catches windows that drop or repeat a stream token when the BOS takes a slot."""
    tokens = torch.arange(10, 60)
    ws = make_windows(tokens, 12, stride=stride, bos=1)
    assert all(int(w.ids[0]) == 1 and w.ids.numel() == 12 for w in ws)
    scored = [int(w.ids[i]) for w in ws for i in range(w.score_from, 12)]
    assert scored == list(range(10, 10 + len(scored))) and len(scored) >= 40


def test_ppl_windows_start_with_the_bos_the_tokenizer_adds(tmp_path: Path) -> None:
    """Perplexity of a model whose tokenizer adds BOS, recomputed by hand on [BOS] + 31
    corpus tokens per window. Catches tokenizing the corpus without the BOS (the windows
    would be 32 corpus tokens)."""
    src = save_tiny("llama", tmp_path / "src")
    bos_tokenizer().save_pretrained(src)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    report = perplexity(str(src), protocol="static", dataset=str(corpus), seq_len=32, max_windows=2)
    model, stream = tiny_model("llama"), char_tokenizer()(TEXT)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for w in range(2):
            ids = torch.tensor([1, *stream[w * 31 : (w + 1) * 31]])
            logits = model(ids[None]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
    assert report.tokens_scored == 2 * 31
    assert report.rows[0].ppl == pytest.approx(math.exp(total / 62), rel=1e-5)
    assert report.params["bos"] is True


def overflowing_model(directory: Path) -> Path:
    """A tiny Llama whose FF inputs overflow float16 (gate and up rows scaled up, down
    scaled down, so float32 stays finite)."""
    save_tiny("llama", directory)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(3000.0)
            layer.mlp.up_proj.weight.mul_(3000.0)
            layer.mlp.down_proj.weight.mul_(1e-6)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("streaming", [False, True])
def test_float16_overflow_is_refused_naming_a_dtype_that_works(
    tmp_path: Path, streaming: bool
) -> None:
    """Catches exporting anyway (top-k of nan keeps neurons 0..k-1) on either path."""
    src = overflowing_model(tmp_path / "src")
    assert export(str(src), [TEXT[:80]], 0.5, out=tmp_path / "ok", streaming=streaming)
    with pytest.raises(UsageError, match=r"not finite in float16.*--dtype bfloat16 or float32"):
        export(str(src), [TEXT[:80]], 0.5, out=tmp_path / "x", dtype="float16", streaming=streaming)
    assert not (tmp_path / "x").exists()


def test_ppl_in_float16_never_reports_nan(tmp_path: Path) -> None:
    """Catches a report (exit 0) with nan perplexities."""
    src = overflowing_model(tmp_path / "src")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = ["ppl", "--model", str(src), "--dataset", str(corpus), "-L", "32", "-P", "16"]
    result = CliRunner().invoke(app, [*args, "--max-windows", "1", "--dtype", "float16"])
    assert result.exit_code == 2, result.output
    assert "bfloat16" in result.output and "nan" not in result.output


def test_griffin_protocol_on_an_export_runs_its_recipe(tmp_path: Path) -> None:
    """An export made with the protect budget: the griffin row must use its per-layer k
    (recomputed here from the budget), not the default uniform ratio 0.5. Catches scoring
    the original at the default ratio and ignoring the export."""
    src = save_tiny("llama", tmp_path / "src")
    out = export(str(src), ["Words."], 0.5, out=tmp_path / "exp", budget="protect").out_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    kwargs = dict(protocol="griffin", dataset=str(corpus), seq_len=32, prompt_len=16)
    report = perplexity(str(out), max_windows=2, **kwargs)  # type: ignore[arg-type]
    assert [r.name for r in report.rows] == ["full", "griffin exp"]

    k = layer_sizes("protect", 3, D_FF, 0.5)
    assert k != [k[1]] * 3
    model, spec = tiny_model("llama"), spec_for("llama")
    stream = char_tokenizer()(TEXT)["input_ids"]
    direct = evaluate(
        # the export's recipe includes its compensation (the default: refit, alpha 1)
        [(model, spec, Setting("g", "griffin", k=k, compensate="refit", alpha=1.0))],
        make_windows(torch.tensor(stream), 32, max_windows=2, min_score_from=16),
        dataset="t",
        protocol="griffin",
        prompt_len=16,
    )
    assert report.rows[1].nll == pytest.approx(direct.rows[0].nll, rel=1e-6)
    with pytest.raises(UsageError, match="export's own recipe"):
        perplexity(str(out), max_windows=2, ratios=[0.5], **kwargs)  # type: ignore[arg-type]


def test_export_beside_its_original_shares_non_ff_tensors(tmp_path: Path) -> None:
    """The shared loading must give the same export as loading it on its own (stock
    from_pretrained, an independent path), while its embedding and attention are the
    original's tensors. Catches sharing the original's FF (wrong logits) or not sharing."""
    src = save_tiny("llama", tmp_path / "src")
    out = export(str(src), ["Words of a prompt."], 0.5, out=tmp_path / "exp").out_dir
    opened, full = open_export_with_original(out)
    alone = open_export(out).loaded.model
    ids = random_ids(20)[None]
    with torch.no_grad():
        assert torch.equal(opened.loaded.model(ids).logits, alone(ids).logits)
    shared, mine = opened.loaded.model.model, full.model.model
    assert shared.embed_tokens.weight is mine.embed_tokens.weight
    assert shared.layers[1].self_attn.q_proj.weight is mine.layers[1].self_attn.q_proj.weight
    assert shared.layers[1].mlp.up_proj.weight.shape[0] < mine.layers[1].mlp.up_proj.weight.shape[0]


def test_generate_on_a_model_file_asks_for_an_export(tmp_path: Path) -> None:
    """Catches the misleading 'does not exist' for a GGUF (or other model) file."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(app, ["generate", "--model", str(gguf), "-t", "hi"])
    assert result.exit_code == 2, result.output
    assert "export directory" in result.output and "griffin export" in result.output


def test_generate_from_an_overflowing_float16_export_fails_instead_of_printing_token_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export made in float16 by a griffin without the overflow check (simulated by
    disabling it). Catches decoding argmax(nan) = token 0 forever with exit 0."""
    import griffin_export.core.selection as selection

    src = overflowing_model(tmp_path / "src")
    monkeypatch.setattr(selection, "check_finite_scores", lambda *args: None)  # both paths
    out = export(str(src), [TEXT[:80]], 0.5, out=tmp_path / "exp", dtype="float16").out_dir
    result = CliRunner().invoke(app, ["generate", "--model", str(out), "-t", "The fox", "-n", "4"])
    assert result.exit_code == 2, result.output
    assert "not finite in float16" in result.output and "bfloat16" in result.output


def write_gguf(path: Path, tensors: dict[str, object]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in tensors.items():
        if isinstance(value, tuple):  # (raw quantized bytes, shape, type)
            data, shape, kind = value
            writer.add_tensor(name, data, raw_shape=shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("matrices", "expected"),
    [("float16", torch.float16), ("float32", torch.float32), ("q8_0", torch.float32)],
)
def test_gguf_float_dtype_is_the_type_its_matrices_are_stored_in(
    tmp_path: Path, matrices: str, expected: torch.dtype
) -> None:
    """``--dtype auto`` for a GGUF source: an F16 file means float16, a quantized one float32;
    the F32 norms every GGUF has must not decide it. Catches taking transformers' float32
    for every GGUF, or counting the 1-D norms (F32) as the model's type."""
    import gguf
    import numpy as np

    from griffin_export.storage.sources import gguf_float_dtype

    norm = np.ones(64, dtype=np.float32)
    if matrices == "q8_0":  # 2 rows of one block each: an f16 scale + 32 int8 (34 bytes)
        q8 = gguf.GGMLQuantizationType.Q8_0
        matrix: object = (np.zeros((2, 34), dtype=np.uint8), (2, 34), q8)
    else:
        matrix = np.zeros((8, 64), dtype=np.dtype(matrices))
    big_norms = {f"blk.{i}.attn_norm.weight": norm for i in range(20)}  # F32 outweighs
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": matrix, **big_norms})
    assert gguf_float_dtype(path) == expected


@pytest.mark.parametrize("size", [1000, (1 << 22) + 777, 3 * (1 << 22) + 5])
def test_gguf_cache_key_follows_content_not_path(tmp_path: Path, size: int) -> None:
    """The embedded GGUF lives inside each virtual environment, so a key on the resolved path
    converted (and stored ~0.5 GB) once per environment. Catches keying on the path or mtime
    (the copy elsewhere must hit the same entry) and hashing only the head of a large file
    (a change in the last bytes, i.e. different tensor data, must give another key)."""
    from griffin_export.storage.sources import gguf_cache_key

    data = bytearray(
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    a = tmp_path / "env1" / "m.gguf"
    b = tmp_path / "env2" / "m.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(data)
    assert gguf_cache_key(a) == gguf_cache_key(b)
    data[-1] ^= 1
    b.write_bytes(data)
    assert gguf_cache_key(a) != gguf_cache_key(b)


def test_unreadable_tokenizer_files_are_named_not_called_missing(tmp_path: Path) -> None:
    """Tokenizer files that are present but do not load are a ModelLoadError naming them and
    the loader's reason; ``None`` is kept for a directory without any. Catches a loader that
    swallows the failure, so the model reads as "has no tokenizer files"."""
    src = save_tiny("llama", tmp_path / "src")
    (src / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*does not load: Expecting"):
        load_tokenizer(resolve_source(str(src)))
    for name in TOKENIZER_FILES:
        (src / name).unlink(missing_ok=True)
    assert load_tokenizer(resolve_source(str(src))) is None


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_unreadable_generation_config_is_a_warning(streaming: bool, tmp_path: Path) -> None:
    """An unreadable generation_config.json (its end tokens lost) is reported among the
    export's warnings, on both load paths. Catches passing over it in silence, as
    ``from_pretrained`` and a ``suppress(Exception)`` around GenerationConfig do."""
    src = save_tiny("llama", tmp_path / "src")
    (src / "generation_config.json").write_text("{not json", encoding="utf-8")
    assert any("generation_config.json" in w for w in load_model(resolve_source(str(src))).warnings)
    result = export(
        str(src), ["Words of a prompt."], 0.5, out=tmp_path / "out", streaming=streaming
    )
    assert [w for w in result.warnings if "generation_config.json" in w and "eos" in w]
    clean = save_tiny("llama", tmp_path / "clean")
    assert load_model(resolve_source(str(clean))).warnings == []
