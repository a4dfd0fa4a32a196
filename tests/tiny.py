"""Tiny random models with odd sizes, one per architecture in the table, and a char tokenizer.

Sizes follow transformers' own model testers (vocab 99, hidden 32, d_ff 37) so that shape
bugs (rows vs columns, fused halves) cannot hide behind square matrices.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 99
HIDDEN = 32
D_FF = 37
LAYERS = 3

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=D_FF,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: model_type -> config overrides (on top of _COMMON where the names apply).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16},
    "olmo": {},
    "olmo2": {},
    "stablelm": {},
    "granite": {},
    "phi3": {},
    "phi": {},
    "starcoder2": {},
    "gpt2": dict(n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=4, n_positions=256),
    "gpt_neox": {},
    "opt": dict(ffn_dim=D_FF, word_embed_proj_dim=HIDDEN, tie_word_embeddings=True),
    "gptj": dict(
        n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=256
    ),
}
# Rows added with the enumeration of transformers' causal-LM types (tests/test_architectures.py).
CONFIGS.update(
    {
        **{
            model_type: {}
            for model_type in (
                "granite_swa",
                "beam",
                "cohere",
                "cohere2",
                "cwm",
                "diffllama",
                "doge",
                "ernie4_5",
                "exaone4",
                "helium",
                "hunyuan_v1_dense",
                "hyperclovax",
                "internlm3",
                "iquestcoder",
                "ministral",
                "ministral3",
                "olmo3",
                "seed_oss",
                "smollm3",
                "vaultgemma",
                "glm",
                "glm4",
                "modernbert-decoder",
                "apertus",
                "apertus1p5_text",
                "arcee",
                "jais2",
                "nemotron",
                "nanochat",
                "persimmon",
                "biogpt",
            )
        },
        "xglm": dict(ffn_dim=D_FF, d_model=HIDDEN, num_layers=LAYERS, attention_heads=4),
        "gpt-sw3": CONFIGS["gpt2"],
        "gpt_bigcode": dict(n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=4, n_positions=256),
        "codegen": dict(
            n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=256
        ),
        "ctrl": dict(n_embd=HIDDEN, dff=D_FF, n_layer=LAYERS, n_head=4, n_positions=256),
    }
)
MODEL_TYPES = sorted(CONFIGS)


def tiny_config(model_type: str, **overrides: Any) -> Any:
    default = AutoConfig.for_model(model_type)
    wanted = {**_COMMON, **CONFIGS[model_type], **overrides}
    # Only pass the common names this config class knows, so that derived fields (Gemma 3's
    # per-layer `layer_types`, for one) are computed for the tiny sizes.
    kwargs = {k: v for k, v in wanted.items() if hasattr(default, k) or k not in _COMMON}
    if hasattr(default, "layer_types"):
        kwargs["layer_types"] = None
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    # Random init leaves some biases/norms at exactly 0/1; perturb everything so that a wrong
    # slice (or a wrong bias rule) changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in string.ascii_letters + string.digits + " .,;:!?'\"-\n()":
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )


def save_tiny(model_type: str, directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random model + char tokenizer saved as an HF directory (safetensors)."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


# -- independent oracles (plain loops, no griffin_export code) ----------------------------------


def loop_statistic(z: Any) -> list[float]:
    """GRIFFIN's ``s_j = sqrt(sum_t (z_tj / ||z_t||)^2)`` written out token by token in
    float64 Python arithmetic; an all-zero token adds nothing. ``z``: rows of floats (or a
    ``[T, d_ff]`` tensor)."""
    rows = z.double().tolist() if isinstance(z, torch.Tensor) else z
    s = [0.0] * len(rows[0])
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        if norm == 0.0:
            continue
        for j, v in enumerate(row):
            s[j] += (v / norm) ** 2
    return [math.sqrt(v) for v in s]


def plain_top_k(scores: Any, k: int) -> list[int]:
    """The ``k`` largest scores' indices, ties to the lower index, ascending: a plain
    ``sorted`` over ``(-score, index)``."""
    values = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(ranked[:k])


def capture_down_inputs(spec: Any, model: torch.nn.Module, ids: torch.Tensor) -> list[Any]:
    """Per layer, the ``[T, d_ff]`` inputs of the down projection for one forward of ``ids``,
    taken by forward pre-hooks on the model's own modules."""
    captured: list[Any] = []
    blocks = list(spec.blocks(model))
    handles = [
        spec.down_module(b).register_forward_pre_hook(
            lambda _m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids.reshape(1, -1))
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(blocks):
        raise RuntimeError(f"captured {len(captured)} down inputs for {len(blocks)} blocks")
    return captured


# -- a SentencePiece tokenizer (for converters that read tokenizer.model) -----------------------


def save_sentencepiece_tokenizer(directory: Path, text: str, vocab_size: int = 512) -> Path:
    """Train a tiny SentencePiece BPE model on ``text`` (byte fallback on, so every string
    tokenizes; ``<unk>``/``<s>``/``</s>`` = 0/1/2, no padding piece) and write it to
    ``directory`` as ``tokenizer.model`` beside a ``tokenizer_config.json`` that transformers
    reads as a ``LlamaTokenizer``. Exactly ``vocab_size`` pieces (byte fallback takes 256)."""
    import io
    import json

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in text.splitlines() if line.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
