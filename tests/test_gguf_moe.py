"""GGUFs of pruned mixture-of-experts models: every MoE family llama.cpp runs converts and
computes what transformers computes on the same pruned checkpoint; the families it cannot run
are refused, each for the reason ``LLAMA_CPP_REFUSED`` gives, and that reason is checked
against llama.cpp itself so a stale row shows.

The tiny models have 8 routed experts of width 16, top-2 routing, and are pruned to 4 experts
of width 8 with griffin's own MoE selection and slicing (``core.moe``, ``core.moe_selection``)
from a random prompt, then saved with ``save_pretrained`` (the per-expert layout transformers
writes back). Every conversion costs 5-25 s (the converter imports torch and transformers; the
BPE families read SmolLM2's 49k-token vocabulary), so the family cases are ``slow``.
"""

from __future__ import annotations

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
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from griffin_export.core.architectures import LLAMA_CPP_REFUSED, MOE_ARCHITECTURES, spec_for
from griffin_export.core.moe import dense_spec, prune_moe_block, set_moe_config
from griffin_export.core.moe_selection import MoeLayerChoice, plan_moe_sizes, select_moe
from griffin_export.core.slicing import prune_block
from griffin_export.engines import llamacpp as llamacpp_module
from griffin_export.engines.llamacpp import converter_dir, write_gguf
from griffin_export.errors import ConverterError, UnsupportedArchitectureError

EXPERTS, WIDTH = 8, 16
KEPT_EXPERTS, KEPT_WIDTH = 4, 8
#: Sizes every tiny MoE shares (the expert count and width go under the family's own keys).
MOE_COMMON: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
#: DeepSeek's multi-head latent attention at tiny sizes, a dense first layer and a shared expert.
_DEEPSEEK: dict[str, Any] = dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=24,
    n_shared_experts=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    head_dim=4,
    num_key_value_heads=4,
)
#: model_type -> config fields beyond :data:`MOE_COMMON`, set as released checkpoints of the
#: family have them where llama.cpp assumes it: OLMoE's key norm spans all heads (KV heads =
#: heads), Qwen3-MoE renormalises the top-k weights (llama.cpp always does for it), Phi-3.5-MoE
#: has longrope and biases, the converter needs them.
MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {},
    "granitemoe": {},
    "olmoe": {"num_key_value_heads": 4},
    "qwen2_moe": {"shared_expert_intermediate_size": 24, "intermediate_size": 24},
    "qwen3_moe": {"intermediate_size": 24, "norm_topk_prob": True},
    "deepseek_v2": _DEEPSEEK,
    # group-limited routing: 2 groups of 4 experts (2 of each kept), the best group's used
    "deepseek_v3": {**_DEEPSEEK, "n_group": 2, "topk_group": 1},
    "glm4_moe": {
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "intermediate_size": 24,
        "n_shared_experts": 1,
    },
    "ernie4_5_moe": {
        "num_hidden_layers": 3,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
        "intermediate_size": 24,
    },
    "gpt_oss": {},
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
    "llama4_text": {
        "intermediate_size_mlp": 24,
        "num_experts_per_tok": 1,
        "moe_layers": None,
        "no_rope_layers": None,
        "attention_chunk_size": 64,
    },
    "minimax": {},
    "flex_olmo": {},
}
#: The MoE families llama.cpp runs: model_type -> the tokenizer its converter takes (test_gguf's
#: kinds), and ``f16`` where the case converts an f16 file too (two of the converter's ways of
#: writing experts: per-expert tensors stacked by Llama's class for Mixtral, gpt-oss's own
#: class with biases; each conversion costs 5-25 s). llama.cpp matches
#: transformers to <= 4e-7 of the largest logit in f32 (gpt-oss: 7e-5; its clamped SwiGLU and
#: attention sinks) and <= 6e-4 in f16 (weights rounded to f16, measured on these models).
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
}
#: MoE families llama.cpp's converter (0.1.1) has no class for: it refuses them itself ("Model
#: X is not supported"), so LLAMA_CPP_REFUSED needs no row.
UNKNOWN_TO_CONVERTER = ("minimax", "flex_olmo")
#: How each LLAMA_CPP_REFUSED row fails on an unpruned tiny model of its family: ``logits``,
#: the converted file runs and its logits differ from transformers' by more than
#: :data:`WRONG_LOGITS` of the largest; ``abort``, llama.cpp kills its process with the failed
#: assertion the reason quotes.
REFUSED_CHECKS: dict[str, str] = {"phimoe": "logits", "llama4_text": "abort"}
WRONG_LOGITS = 0.05
TOKENIZERS = {**MOE_FAMILIES, "phimoe": "spm", "llama4_text": "bpe"}


def tiny_moe(model_type: str, vocab_size: int, seed: int = 0) -> Any:
    """A tiny random ``model_type`` with :data:`EXPERTS` routed experts of width :data:`WIDTH`
    (under the family's config keys), every parameter perturbed off its initial 0/1."""
    moe = spec_for(model_type).moe if model_type in MOE_ARCHITECTURES else None
    sizes = {
        "num_local_experts" if moe is None else moe.count_key: EXPERTS,
        "intermediate_size" if moe is None else moe.width_key: WIDTH,
    }
    default = AutoConfig.for_model(model_type)
    wanted = {**MOE_COMMON, **sizes, **MOE_CONFIGS[model_type], "vocab_size": vocab_size}
    kwargs = {k: v for k, v in wanted.items() if hasattr(default, k) or k not in MOE_COMMON}
    if hasattr(default, "layer_types"):
        kwargs["layer_types"] = None
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def prune_moe(model: Any, model_type: str) -> None:
    """Prune ``model`` in place to :data:`KEPT_EXPERTS` experts of :data:`KEPT_WIDTH` per MoE
    layer (dense layers and shared experts to half their width) from a random prompt, with
    griffin's selection and slicing, and write the kept sizes into its config."""
    spec = spec_for(model_type)
    ids = torch.randint(3, SPM_VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    sizes = plan_moe_sizes(spec, model, KEPT_WIDTH / WIDTH, KEPT_EXPERTS / EXPERTS)
    selection = select_moe(spec, model, [ids], sizes)
    for block, choice in zip(spec.blocks(model), selection.layers, strict=True):
        if isinstance(choice, MoeLayerChoice):
            prune_moe_block(spec, block, choice.experts, choice.neurons, choice.shared)
        else:
            prune_block(dense_spec(spec), block, choice, sizes.dense_total or 0)
    set_moe_config(spec, model.config, sizes.experts, sizes.width, sizes.dense, sizes.shared)


def moe_source(tmp_path: Path, model_type: str, tokenizer_dir: Path, *, prune: bool = True) -> Path:
    """A tiny ``model_type`` (pruned unless ``prune`` is false) saved with the tokenizer files
    of ``tokenizer_dir``, its vocabulary sized to match."""
    kind = TOKENIZERS[model_type].split()[0]
    vocab = {"spm": SPM_VOCAB, "bpe": VOCAB, "glm": VOCAB + len(GLM_TOKENS)}[kind]
    model = tiny_moe(model_type, vocab)
    if prune:
        prune_moe(model, model_type)
    directory = tmp_path / f"src-{model_type}"
    model.save_pretrained(directory)
    for name in ("tokenizer.model" if kind == "spm" else "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of a GGUF (arrays as lists)."""
    from gguf import GGUFReader

    return {name: f.contents() for name, f in GGUFReader(str(path)).fields.items()}


def convert_unchecked(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the converter driver on ``source`` as ``write_gguf`` runs it, without griffin's
    family refusal (f32)."""
    driver = Path(llamacpp_module.__file__).with_name("_llamacpp_convert.py")
    return subprocess.run(
        [sys.executable, str(driver), str(source), str(out), "f32"],
        env={**os.environ, "PYTHONPATH": str(converter_dir())},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tokenizer(request: pytest.FixtureRequest, model_type: str) -> Path:
    return request.getfixturevalue(TOKENIZER_FIXTURES[TOKENIZERS[model_type].split()[0]])


def test_every_moe_family_has_a_gguf_case() -> None:
    """Each MoE family of the architecture table is converted and compared below, refused with
    a checked reason, or unknown to the converter. Catches a family added to MOE_ARCHITECTURES
    whose GGUF nobody ran."""
    covered = set(MOE_FAMILIES) | set(LLAMA_CPP_REFUSED) | set(UNKNOWN_TO_CONVERTER)
    assert set(MOE_ARCHITECTURES) <= covered, set(MOE_ARCHITECTURES) - covered
    assert not set(MOE_FAMILIES) & set(LLAMA_CPP_REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_pruned_moe_gguf_runs_in_llama_cpp_like_transformers(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A tiny MoE pruned 8 -> 4 experts and 16 -> 8 neurons per expert, converted by write_gguf:
    the GGUF states 4 experts of width 8, and llama.cpp's logits equal transformers' on the
    same checkpoint to 2e-4 of the largest in f32 (1e-3 for gpt-oss), 2e-3 in f16; the export's
    config.json is left byte for byte as it was. Catches router rows out of step with the
    experts, an expert count or width the converter reads from a stale field, a shared
    expert's width mis-stated (ERNIE's converter derives it from the dense width), DeepSeek-V3
    routed by softmax (no ``scoring_func`` for the converter), a family whose converter module
    fails to import (GLM-4.5's imports DeepSeek's), and the config fixes written into the
    user's export instead of the converter's memory."""
    how = MOE_FAMILIES[model_type].split()
    source = moe_source(tmp_path, model_type, _tokenizer(request, model_type))
    config = (source / "config.json").read_bytes()
    ids = _ids()
    want = transformers_logits(source, ids)
    for outtype in ("f32", "f16") if "f16" in how else ("f32",):
        result = write_gguf(source, tmp_path / f"m-{outtype}.gguf", outtype)
        meta = gguf_metadata(result.path)
        arch = result.architecture
        assert meta[f"{arch}.expert_count"] == KEPT_EXPERTS
        assert meta.get(f"{arch}.expert_feed_forward_length", KEPT_WIDTH) == KEPT_WIDTH
        if model_type == "deepseek_v3":
            assert meta[f"{arch}.expert_gating_func"] == 2  # sigmoid
        got = llama_cpp_logits(result.path, ids)
        bound = {"f32": 1e-3 if model_type == "gpt_oss" else 2e-4, "f16": 2e-3}[outtype]
        np.testing.assert_allclose(got, want, atol=bound * np.abs(want).max(), rtol=0)
    assert (source / "config.json").read_bytes() == config


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
    """Each LLAMA_CPP_REFUSED row says how it is checked against llama.cpp. Catches a row
    added with a reason nobody ran."""
    assert set(REFUSED_CHECKS) == set(LLAMA_CPP_REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REFUSED_CHECKS))
def test_every_refused_family_still_fails_in_llama_cpp(
    model_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An unpruned tiny model of each refused family, converted by the driver directly: it
    converts, and llama.cpp then fails as the row's reason says (logits off by more than 5% of
    the largest, or an abort with the assertion the reason quotes). Catches a stale row: a
    llama.cpp or converter that now runs the family (the row must go) or fails otherwise."""
    source = moe_source(tmp_path, model_type, _tokenizer(request, model_type), prune=False)
    gguf = tmp_path / "m.gguf"
    done = convert_unchecked(source, gguf)
    assert done.returncode == 0, done.stderr[-2000:]
    reason = LLAMA_CPP_REFUSED[model_type]
    ids = _ids()
    if REFUSED_CHECKS[model_type] == "logits":
        got, want = llama_cpp_logits(gguf, ids), transformers_logits(source, ids)
        assert np.abs(got - want).max() > WRONG_LOGITS * np.abs(want).max()
        return
    run = (
        "import llama_cpp, sys; "
        f"m = llama_cpp.Llama(model_path={str(gguf)!r}, n_ctx=64, verbose=False); "
        f"m.eval({ids!r})"
    )
    ran = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300)
    assert ran.returncode == -signal.SIGABRT, (ran.returncode, ran.stderr[-2000:])
    assertion = reason.split("GGML_ASSERT: ", 1)[1].split(")", 1)[0]
    assert "GGML_ASSERT" in ran.stderr and assertion in ran.stderr, ran.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", UNKNOWN_TO_CONVERTER)
def test_moe_family_unknown_to_the_converter_is_its_one_line_error(
    model_type: str, tmp_path: Path
) -> None:
    """A family llama.cpp's converter has no class for fails in one ConverterError line naming
    its architecture as not supported, and leaves no file. Catches such a family (which has no
    LLAMA_CPP_REFUSED row) failing later or with a traceback."""
    config = AutoConfig.for_model(model_type)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    config.save_pretrained(tmp_path / "src")
    with pytest.raises(ConverterError, match="is not supported") as caught:
        write_gguf(tmp_path / "src", tmp_path / "m.gguf", "f16")
    assert config.architectures[0] in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))
