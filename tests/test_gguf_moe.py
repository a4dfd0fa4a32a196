"""GGUFs of pruned mixture-of-experts exports: every MoE family llama.cpp runs converts and
computes what transformers computes on the same export; the families it cannot run are
refused, each for the reason ``LLAMA_CPP_REFUSED`` gives, and each reason is checked against
the converter or llama.cpp itself so a stale row shows.

The tiny models are tests/tiny_moe.py's (8 routed experts of width 16, top-2, a dense first
block where the family has dense layers), with a tokenizer llama.cpp's converter takes (see
tests/test_gguf.py), exported by ``griffin export`` at ``--experts 0.5 --ratio 0.5``: 4 experts
of width 8. Every conversion costs 5-25 s (the converter imports torch and transformers; the
BPE families read SmolLM2's 49k-token vocabulary), so the family cases are ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_gguf import (  # noqa: F401  (fixtures: pytest finds them by name in this module)
    GLM_TOKENS,
    PROMPT,
    SPM_VOCAB,
    TOKENIZER_FIXTURES,
    VOCAB,
    _ids,
    glm_tokenizer,
    llama_cpp_logits,
    smol_tokenizer,
    spm_tokenizer,
    transformers_logits,
)
from tiny_moe import EXPERTS, WIDTH, tiny_moe_config, tiny_moe_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from griffin_export import export
from griffin_export.core.architectures import (
    LLAMA_CPP_NEEDS,
    LLAMA_CPP_REFUSED,
    MOE_ARCHITECTURES,
)
from griffin_export.engines import llamacpp as llamacpp_module
from griffin_export.engines.llamacpp import converter_dir, write_gguf
from griffin_export.errors import ConverterError, UnsupportedArchitectureError
from griffin_export.formats.manifest import read_manifest
from griffin_export.formats.verify import verify_export

#: ``--experts`` and ``--ratio`` of every export here
KEEP = 0.5
KEPT_EXPERTS, KEPT_WIDTH = int(EXPERTS * KEEP), int(WIDTH * KEEP)
#: model_type -> config fields set as the family's released checkpoints have them, where
#: llama.cpp assumes them: OLMoE's key norm, dots.llm1's KV projections and DeepSeek's latent
#: attention (DeepSeek-V2/V3, Sarvam-MLA, GLM-4.7-Flash; the converter asserts it) span all
#: heads (KV heads = heads), Qwen3-MoE renormalises the top-k weights (llama.cpp always does for
#: it) and has no dense layers (LLAMA_CPP_NEEDS), Phi-3.5-MoE has longrope and biases (the
#: converter needs them).
KV_ALL_HEADS = ("olmoe", "dots1", "deepseek_v2", "deepseek_v3", "sarvam_mla", "glm4_moe_lite")
GGUF_OVERRIDES: dict[str, dict[str, Any]] = {
    **{model_type: {"num_key_value_heads": 4} for model_type in KV_ALL_HEADS},
    "qwen2_moe": {"mlp_only_layers": []},
    "qwen3_moe": {"norm_topk_prob": True, "mlp_only_layers": []},
    "phimoe": {
        "lm_head_bias": True,
        "attention_bias": True,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 4,
            "long_factor": [1.0] * 4,
            "original_max_position_embeddings": 256,
            "short_mscale": 1.0,
            "long_mscale": 1.0,
        },
    },
}
#: Llama 4's text model is no griffin family (tiny_moe has none); its LLAMA_CPP_REFUSED row is
#: checked on a tiny one, unpruned: tiny_moe's Mixtral sizes (these fields) plus its own.
LLAMA4_SHARED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
    "intermediate_size",
)
LLAMA4_TEXT: dict[str, Any] = dict(
    intermediate_size_mlp=24,
    num_experts_per_tok=1,
    moe_layers=None,
    no_rope_layers=None,
    attention_chunk_size=64,
    layer_types=None,
)
#: The MoE families llama.cpp runs: model_type -> the tokenizer its converter takes
#: (tests/test_gguf.py's kinds), and ``f16`` where the case writes an f16 file too (two of the
#: converter's ways of writing experts: per-expert tensors stacked by Llama's class for
#: Mixtral, gpt-oss's own class with biases). llama.cpp matches transformers to <= 4e-7 of the
#: largest logit in f32 (gpt-oss: 4e-5; its clamped SwiGLU and attention sinks) and <= 7e-4 in
#: f16 (weights rounded to f16), measured on these exports.
MOE_FAMILIES: dict[str, str] = {
    "mixtral": "spm f16",
    "granitemoe": "spm",
    "ernie4_5_moe": "spm",
    "olmoe": "bpe",
    "qwen2_moe": "bpe",
    "qwen3_moe": "bpe",
    "deepseek_v2": "bpe",
    "deepseek_v3": "bpe",
    "glm4_moe": "glm",
    "gpt_oss": "bpe f16",
    "exaone_moe": "bpe",
    "sarvam_mla": "bpe",
}
#: MoE families llama.cpp's converter (0.1.1) has no class for: it refuses them itself ("Model
#: X is not supported"), so LLAMA_CPP_REFUSED needs no row.
UNKNOWN_TO_CONVERTER = (
    "aria_text",
    "axk1",
    "axk2",
    "flex_olmo",
    "flint",
    "granitemoe_swa",
    "hy_v4",
    "kolibri1",
    "minimax",
    "minimax_m3_vl_text",
)
#: MoE families whose GGUF nobody has checked yet (added to the table after this file), with
#: what their tiny export did: not refused, not claimed to work.
UNCHECKED: dict[str, str] = {
    "deepseek_v32": "the converter asserts add_bos_token on the tokenizer (not reached)",
    "solar_open": "the converter looks up GLM-style special tokens the test tokenizer lacks",
}
#: How each LLAMA_CPP_REFUSED row fails, as ``(kind, evidence)``, on the family's pruned tiny
#: export (Llama 4: the unpruned model). ``logits``: the file runs and its logits differ from
#: transformers' by more than :data:`WRONG_LOGITS` of the largest; ``load``: llama.cpp refuses
#: the file, ``abort``: it kills its process, its log holding ``evidence``; ``converter``: the
#: converter driver fails, ``evidence`` in its last line. The reason quotes ``evidence``.
REFUSED_CHECKS: dict[str, tuple[str, str | None]] = {
    "phimoe": ("logits", None),
    "afmoe": ("logits", None),
    "llama4_text": ("abort", "tensor buffer not set"),
    "dots1": ("abort", "fatal error"),
    "glm4_moe_lite": ("load", "tensor 'blk.0.ffn_gate_inp.weight' not found"),
    "cohere2_moe": ("load", "tensor 'blk.0.ffn_gate.weight' has wrong shape"),
    "hy_v3": ("converter", "MODEL_ARCH.HY_V3: absent from the converter's bundled gguf"),
    "laguna": ("converter", "MODEL_ARCH.LAGUNA: absent from the converter's bundled gguf"),
    "glm_moe_dsa": ("converter", "'GGUFWriter' object has no attribute 'add_indexer_types'"),
    "sarvam_moe": (
        "converter",
        "Can not map tensor 'model.layers.0.attention.query_key_value.weight'",
    ),
    "mellum": ("converter", "Can not map tensor 'model.layers.0.mlp.down_proj.weight'"),
    "hunyuan_v1_moe": ("converter", "KeyError: 'moe_intermediate_size'"),
    "minimax_m2": ("converter", "could not find any of: ['rotary_dim']"),
    "mimo_v2_flash": ("converter", "KeyError: 'swa_head_dim'"),
}
WRONG_LOGITS = 0.05
#: the tokenizer each refused family's check borrows
TOKENIZERS = {
    **MOE_FAMILIES,
    **dict.fromkeys(REFUSED_CHECKS, "bpe"),
    "phimoe": "spm",
    "glm4_moe_lite": "glm",
    "glm_moe_dsa": "glm",
    "sarvam_moe": "glm",
}


def moe_source(tmp_path: Path, model_type: str, tokenizer_dir: Path) -> Path:
    """tiny_moe's ``model_type`` (with :data:`GGUF_OVERRIDES`) saved with the tokenizer files
    of ``tokenizer_dir``, its vocabulary sized to match."""
    kind = TOKENIZERS[model_type].split()[0]
    vocab = {"spm": SPM_VOCAB, "bpe": VOCAB, "glm": VOCAB + len(GLM_TOKENS)}[kind]
    if model_type == "llama4_text":
        torch.manual_seed(0)
        sizes = tiny_moe_config("mixtral").to_dict()
        shared = {k: sizes[k] for k in LLAMA4_SHARED}
        config = AutoConfig.for_model(model_type, vocab_size=vocab, **shared, **LLAMA4_TEXT)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = tiny_moe_model(model_type, vocab_size=vocab, **GGUF_OVERRIDES.get(model_type, {}))
    directory = tmp_path / f"src-{model_type}"
    model.save_pretrained(directory)
    for name in ("tokenizer.model" if kind == "spm" else "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


def moe_export(source: Path, out: Path, **kwargs: Any) -> Path:
    export(str(source), [PROMPT], KEEP, experts=KEEP, out=out, **kwargs)
    return out


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of a GGUF (arrays as lists)."""
    from gguf import GGUFReader

    return {name: f.contents() for name, f in GGUFReader(str(path)).fields.items()}


def converter_env() -> dict[str, str]:
    """The environment write_gguf runs its converter child in."""
    return {**os.environ, "PYTHONPATH": str(converter_dir())}


def _driver() -> Path:
    return Path(llamacpp_module.__file__).with_name("_llamacpp_convert.py")


def _tokenizer(request: pytest.FixtureRequest, model_type: str) -> Path:
    return request.getfixturevalue(TOKENIZER_FIXTURES[TOKENIZERS[model_type].split()[0]])


def test_every_moe_family_has_a_gguf_case() -> None:
    """Each MoE family of the architecture table is converted and compared below, refused with
    a checked reason, unknown to the converter, or listed as unchecked. Catches a family added
    to MOE_ARCHITECTURES whose GGUF nobody ran, or one both compared and refused."""
    groups = [set(MOE_FAMILIES), set(LLAMA_CPP_REFUSED), set(UNKNOWN_TO_CONVERTER), set(UNCHECKED)]
    assert set(MOE_ARCHITECTURES) <= set().union(*groups), set(MOE_ARCHITECTURES) - set().union(
        *groups
    )
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "a family in two groups"


def test_the_converter_knows_exactly_the_families_said() -> None:
    """llama.cpp's converter registry (read in a child, as the converter runs) has a class for
    every family compared or refused here and none for UNKNOWN_TO_CONVERTER. Catches a newer
    converter that supports one of them (then it needs a case) or the lists drifting."""
    code = "import json, conversion; print(json.dumps(list(conversion.TEXT_MODEL_MAP)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=converter_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    known = set(json.loads(done.stdout))
    names = {t: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in MOE_ARCHITECTURES}
    assert not {t for t in UNKNOWN_TO_CONVERTER if names[t] in known}
    aliases = {"phimoe"}  # PhimoeForCausalLM: the driver renames it (ARCHITECTURE_NAMES)
    said = (set(MOE_FAMILIES) | set(LLAMA_CPP_REFUSED)) & set(names) - aliases
    assert not {t for t in said if names[t] not in known}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_pruned_moe_gguf_runs_in_llama_cpp_like_transformers(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``export(gguf="f32")`` of a tiny MoE at --experts 0.5 --ratio 0.5 (and write_gguf f16
    where the family says): the GGUF in the export states 4 experts of width 8, is in the
    manifest (verify passes), and llama.cpp's logits equal transformers' on the export to 2e-4
    of the largest in f32 (1e-3 for gpt-oss), 2e-3 in f16; write_gguf leaves config.json byte
    for byte as it was. Catches router rows out of step with the experts, an expert count or
    width read from a stale field, a shared expert's width mis-stated (ERNIE's converter
    derives it from the dense width), DeepSeek-V3 routed by softmax (no ``scoring_func`` for
    the converter; EXAONE-MoE's file then does not even load), a family whose converter module
    fails to import (GLM-4.5's imports DeepSeek's), and the config fixes written into the
    user's export."""
    how = MOE_FAMILIES[model_type].split()
    source = moe_source(tmp_path, model_type, _tokenizer(request, model_type))
    out = moe_export(source, tmp_path / "export", gguf="f32")
    assert "model-f32.gguf" in read_manifest(out).files and verify_export(out).ok
    config = (out / "config.json").read_bytes()
    ids = _ids()
    want = transformers_logits(out, ids)
    files = {"f32": out / "model-f32.gguf"}
    if "f16" in how:
        files["f16"] = write_gguf(out, tmp_path / "m-f16.gguf", "f16").path
    for outtype, path in files.items():
        meta = gguf_metadata(path)
        arch = meta["general.architecture"]
        assert meta[f"{arch}.expert_count"] == KEPT_EXPERTS
        assert meta.get(f"{arch}.expert_feed_forward_length", KEPT_WIDTH) == KEPT_WIDTH
        if model_type == "deepseek_v3":
            assert meta[f"{arch}.expert_gating_func"] == 2  # sigmoid
        got = llama_cpp_logits(path, ids)
        bound = {"f32": 1e-3 if model_type == "gpt_oss" else 2e-4, "f16": 2e-3}[outtype]
        np.testing.assert_allclose(got, want, atol=bound * np.abs(want).max(), rtol=0)
    assert (out / "config.json").read_bytes() == config


@pytest.mark.parametrize("model_type", sorted(LLAMA_CPP_REFUSED))
def test_refused_family_is_refused_before_the_converter(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_gguf on a checkpoint of a refused family raises one line with its reason, before
    the converter is looked for (none is installed here). Catches the row being ignored."""
    monkeypatch.setenv(llamacpp_module.CONVERTER_ENV, str(tmp_path / "nowhere"))
    AutoConfig.for_model(model_type).save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError) as caught:
        write_gguf(tmp_path / "src", tmp_path / "m.gguf", "f16")
    assert LLAMA_CPP_REFUSED[model_type] in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.glob("*.gguf"))


def test_every_refused_row_has_a_check() -> None:
    """Each LLAMA_CPP_REFUSED row says how it is checked against llama.cpp, and its reason
    quotes the evidence. Catches a row added with a reason nobody ran."""
    assert set(REFUSED_CHECKS) == set(LLAMA_CPP_REFUSED)
    for model_type, (_, evidence) in REFUSED_CHECKS.items():
        assert evidence is None or evidence in LLAMA_CPP_REFUSED[model_type]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REFUSED_CHECKS))
def test_every_refused_family_still_fails_in_llama_cpp(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The family's tiny pruned export (Llama 4: the unpruned model), converted by the driver
    directly (write_gguf would refuse it): it fails as the row says. Catches a stale row: a
    converter or llama.cpp that now runs the family (the row must go) or fails otherwise."""
    kind, evidence = REFUSED_CHECKS[model_type]
    source = moe_source(tmp_path, model_type, _tokenizer(request, model_type))
    if model_type in MOE_ARCHITECTURES:
        source = moe_export(source, tmp_path / "export")
    gguf = tmp_path / "m.gguf"
    done = subprocess.run(
        [sys.executable, str(_driver()), str(source), str(gguf), "f32"],
        env=converter_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if kind == "converter":
        assert done.returncode != 0 and evidence is not None
        assert evidence in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    ids = _ids()
    if kind == "logits":
        got, want = llama_cpp_logits(gguf, ids), transformers_logits(source, ids)
        assert np.abs(got - want).max() > WRONG_LOGITS * np.abs(want).max()
        return
    run = (
        "import llama_cpp; "
        f"m = llama_cpp.Llama(model_path={str(gguf)!r}, n_ctx=64, verbose=True); "
        f"m.eval({ids!r})"
    )
    ran = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300)
    # load: llama-cpp-python raises (exit 1); abort: llama.cpp kills the process
    assert ran.returncode == (1 if kind == "load" else -signal.SIGABRT), ran.stderr[-2000:]
    assert evidence is not None and evidence in ran.stderr, ran.stderr[-2000:]


@pytest.mark.slow
def test_moe_family_unknown_to_the_converter_is_its_one_line_error(tmp_path: Path) -> None:
    """A family llama.cpp's converter has no class for (MiniMax) fails in one ConverterError
    line naming its architecture as not supported, and leaves no file. Catches such a family
    (which has no LLAMA_CPP_REFUSED row) failing later or with a traceback."""
    config = AutoConfig.for_model("minimax")
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["minimax"]]
    config.save_pretrained(tmp_path / "src")
    with pytest.raises(ConverterError, match="is not supported") as caught:
        write_gguf(tmp_path / "src", tmp_path / "m.gguf", "f16")
    assert "MiniMaxForCausalLM" in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


@pytest.mark.parametrize("model_type", sorted(LLAMA_CPP_NEEDS))
def test_qwen_moe_with_dense_layers_is_refused_before_the_converter(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Qwen MoE config with a dense layer (``mlp_only_layers=[0]``, tiny_moe's default) is
    refused by write_gguf in one line naming the field, before the converter is looked for.
    Catches the converter's own late "Can not map tensor" in its place."""
    monkeypatch.setenv(llamacpp_module.CONVERTER_ENV, str(tmp_path / "nowhere"))
    tiny_moe_config(model_type).save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError, match="mlp_only_layers is \\[0\\]") as caught:
        write_gguf(tmp_path / "src", tmp_path / "m.gguf", "f16")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(LLAMA_CPP_NEEDS))
def test_qwen_moe_dense_layers_still_fail_in_the_converter(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """tiny_moe's model (its block 0 dense by ``mlp_only_layers=[0]``), exported and converted
    by the driver directly (write_gguf would refuse it), fails as LLAMA_CPP_NEEDS says. Catches
    a stale refusal: a converter that now maps the dense layers (the entry must go)."""
    overrides = {
        k: v for k, v in GGUF_OVERRIDES.get(model_type, {}).items() if k in {"norm_topk_prob"}
    }
    model = tiny_moe_model(model_type, vocab_size=VOCAB, **overrides)
    assert model.config.mlp_only_layers == [0]
    source = tmp_path / "src"
    model.save_pretrained(source)
    tokenizer = _tokenizer(request, model_type)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tokenizer / name).read_bytes())
    out = moe_export(source, tmp_path / "export")
    done = subprocess.run(
        [sys.executable, str(_driver()), str(out), str(tmp_path / "m.gguf"), "f32"],
        env=converter_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "Can not map tensor 'model.layers.0.mlp.down_proj.weight'" in done.stderr


def test_export_gguf_refuses_qwen_moe_dense_layers_before_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export(..., gguf=...)`` on a Qwen MoE with a dense layer refuses in one line naming
    ``mlp_only_layers`` before any prompt runs (selection is made to fail if reached) and
    leaves no output. Catches the check living only in write_gguf, i.e. after the whole
    export was scored and written."""
    from tiny_moe import save_tiny_moe

    import griffin_export.build.export as export_module

    def scored(*_: Any, **__: Any) -> None:
        raise AssertionError("selection ran before the GGUF refusal")

    monkeypatch.setattr(export_module, "select_moe", scored)
    source = save_tiny_moe("qwen2_moe", tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitectureError, match="mlp_only_layers") as caught:
        export(str(source), ["a b c d e f"], 0.5, experts=0.5, out=out, gguf="f16")
    assert "\n" not in str(caught.value)
    assert not out.exists()
