"""Tiny random mixture-of-experts models, one per MoE family of the architecture table, and
an independent oracle: the full model with removed experts excluded from routing and dropped
neurons zeroed.

Every tiny model has hidden 32, 8 routed experts of width 16, top-2 routing and 3 decoder
blocks; where the family has dense layers (``first_k_dense_replace``, ``mlp_only_layers``,
``moe_layer_start_index``, ``mlp_layer_types``...) block 0 is dense (width 24), and shared
experts are on where the family has them. DeepSeek-V3 routes by groups (2 groups, 1 chosen).

The oracle (:func:`masked_original`) uses no griffin code: it finds the router's weight as
the MoE module's one ``[experts, hidden]`` matrix outside the experts and the shared expert,
and masks routing per the family's kind (:data:`ROUTING`):

* ``"logits"`` (softmax-then-top-k, top-k-then-softmax/sigmoid): the router's linear output
  gets ``-inf`` at removed experts (``torch.nn.functional.linear`` patched while the router
  runs; the oracle checks the patch fired);
* ``"bias:<name>"`` (sigmoid scores plus a selection bias): the *biased selection score* is
  ``-inf`` at removed experts, by setting the named correction bias there to ``-inf``;
* ``"logits+bias:<name>"`` (ERNIE: *softmax* probabilities plus a selection bias): both. A
  model without the removed experts takes its softmax over the kept ones, which rescales the
  kept probabilities per token against the unchanged bias, so masking the selection score
  alone is not what it computes (3e-2 apart in the logits of the tiny model).

Dropped neurons: each kept expert's down slab gets zeros at its dropped neurons (the slab's
axis from the module's own ``is_transposed`` flag), a removed expert's whole slab is left
(it is never routed to), and a dense layer's or shared expert's ``down_proj`` gets zero
columns at its dropped neurons.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from tiny import char_tokenizer

VOCAB = 99
HIDDEN = 32
EXPERTS = 8
TOP_K = 2
WIDTH = 16  # routed experts
DENSE = 24  # dense layers, and shared experts with their own width field
LAYERS = 3

#: set on every config class that has the field (a field a class lacks is dropped)
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    intermediate_size=DENSE,
    moe_intermediate_size=WIDTH,
    # routed expert count / top-k under every family's name
    num_experts=EXPERTS,
    num_local_experts=EXPERTS,
    n_routed_experts=EXPERTS,
    moe_num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_k=TOP_K,
    moe_topk=TOP_K,
    # one shared expert where the family has them
    n_shared_experts=1,
    num_shared_experts=1,
    moe_num_shared_experts=1,
    shared_expert_intermediate_size=DENSE,
    # block 0 dense where the family has dense layers
    first_k_dense_replace=1,
    num_dense_layers=1,
    mlp_only_layers=[0],
    decoder_sparse_step=1,
    moe_layer_start_index=1,
    moe_layer_end_index=LAYERS - 1,
    mlp_layer_types=["dense"] + ["sparse"] * (LAYERS - 1),
    # multi-head latent attention, small
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    layer_types=None,
)

#: DeepSeek sparse attention's indexer, small (its heads must match the attention's)
_DSA: dict[str, Any] = dict(num_key_value_heads=4, index_head_dim=8, index_n_heads=2, index_topk=4)

#: model_type -> config overrides on top of _COMMON (the routed width under its own key)
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=WIDTH),
    "minimax": dict(intermediate_size=WIDTH, layer_types=["full_attention"] * LAYERS),
    "phimoe": dict(intermediate_size=WIDTH),
    "olmoe": dict(intermediate_size=WIDTH),
    "flex_olmo": dict(intermediate_size=WIDTH),
    "granitemoe": dict(intermediate_size=WIDTH),
    "gpt_oss": dict(intermediate_size=WIDTH),
    "qwen2_moe": {},
    "qwen3_moe": {},
    "deepseek_v2": {},
    "deepseek_v3": dict(n_group=2, topk_group=1, head_dim=4),
    "glm4_moe": {},
    "ernie4_5_moe": {},
    "dots1": {},
    "solar_open": {},
    "mimo_v2_flash": {},
    "exaone_moe": {},
    "afmoe": {},
    "minimax_m2": dict(intermediate_size=WIDTH),
    "hy_v3": {},
    "kolibri1": {},
    "laguna": {},
    "minimax_m3_vl_text": dict(
        intermediate_size=WIDTH, dense_intermediate_size=DENSE, shared_intermediate_size=DENSE
    ),
    "mellum": {},
    "flint": {},
    "aria_text": dict(intermediate_size=WIDTH),
    "cohere2_moe": dict(intermediate_size=WIDTH),
    "hunyuan_v1_moe": dict(intermediate_size=WIDTH),
    "granitemoe_swa": dict(intermediate_size=WIDTH),
    "sarvam_mla": dict(head_dim=4),
    "sarvam_moe": {},
    "glm4_moe_lite": dict(head_dim=4),
    "deepseek_v32": dict(head_dim=4, **_DSA),
    "glm_moe_dsa": dict(head_dim=4, **_DSA),
    "axk1": dict(head_dim=4),
    "axk2": dict(head_dim=4, **_DSA),
    "hy_v4": {},
}

#: model_type -> how the oracle excludes removed experts from routing (module docstring)
ROUTING: dict[str, str] = {
    "mixtral": "logits",
    "minimax": "logits",
    "phimoe": "logits",
    "olmoe": "logits",
    "flex_olmo": "logits",
    "granitemoe": "logits",
    "gpt_oss": "logits",
    "qwen2_moe": "logits",
    "qwen3_moe": "logits",
    "deepseek_v2": "logits",
    "deepseek_v3": "bias:e_score_correction_bias",
    "glm4_moe": "bias:e_score_correction_bias",
    "ernie4_5_moe": "logits+bias:e_score_correction_bias",
    "dots1": "bias:e_score_correction_bias",
    "solar_open": "bias:e_score_correction_bias",
    "mimo_v2_flash": "bias:e_score_correction_bias",
    "exaone_moe": "bias:e_score_correction_bias",
    "afmoe": "bias:expert_bias",
    "minimax_m2": "bias:e_score_correction_bias",
    "hy_v3": "bias:e_score_correction_bias",
    "kolibri1": "bias:e_score_correction_bias",
    "laguna": "bias:e_score_correction_bias",
    "minimax_m3_vl_text": "bias:e_score_correction_bias",
    "mellum": "logits",
    "flint": "logits",
    "aria_text": "logits",
    "cohere2_moe": "logits",
    "hunyuan_v1_moe": "logits",
    "granitemoe_swa": "logits",
    "sarvam_mla": "bias:e_score_correction_bias",
    "sarvam_moe": "bias:e_score_correction_bias",
    **dict.fromkeys(
        ("glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "axk1", "axk2", "hy_v4"),
        "bias:e_score_correction_bias",
    ),
}
MODEL_TYPES = sorted(CONFIGS)


def tiny_moe_config(model_type: str, **overrides: Any) -> Any:
    default = AutoConfig.for_model(model_type)
    wanted = {**_COMMON, **CONFIGS[model_type], **overrides}
    kwargs = {k: v for k, v in wanted.items() if hasattr(default, k) or k not in _COMMON}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_moe_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random MoE model in eval mode, every parameter and buffer perturbed (router
    and correction biases included) so that a wrong slice changes the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(model_type, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "bias" in name:
                b.add_(torch.randn_like(b) * 0.1)
    return model.eval()


def save_tiny_moe(model_type: str, directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random MoE model + char tokenizer saved as an HF directory (safetensors)."""
    model = tiny_moe_model(model_type, seed=seed, **overrides)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


# -- the masked original ------------------------------------------------------------------------
@dataclass
class Keep:
    """One layer's kept parts: a dense layer's ``neurons`` only; an MoE layer's ``experts``
    (original indices), ``neurons[i]`` the kept neurons of ``experts[i]``, ``shared`` the
    shared expert's kept neurons (``None`` without one)."""

    neurons: Sequence[Sequence[int]] | Sequence[int]
    experts: Sequence[int] | None = None
    shared: Sequence[int] | None = None


def _experts_module(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(moe_module, experts)``: the fused experts (a module holding a 3-D ``down_proj``)
    and the module that owns them, found by walking ``block``."""
    for _name, module in block.named_modules():
        for child in module.children():
            down = getattr(child, "down_proj", None)
            if isinstance(down, Tensor) and down.dim() == 3:
                return module, child
    return None


def _down_linears(module: nn.Module, skip: nn.Module | None) -> list[nn.Linear]:
    """The ``down_proj`` linears of ``module`` (a dense FF, or an MoE block's shared expert),
    those inside ``skip`` excluded."""
    found = []
    for name, child in module.named_modules():
        if skip is not None and any(child is m for m in skip.modules()):
            continue
        if name.split(".")[-1] == "down_proj" and isinstance(child, nn.Linear):
            found.append(child)
    return found


def router_weight(moe: nn.Module, experts: nn.Module, n_experts: int) -> Tensor:
    """The one ``[n_experts, hidden]`` matrix of ``moe`` outside ``experts``."""
    inside = {id(p) for p in experts.parameters()}
    found = [
        p
        for _n, p in moe.named_parameters()
        if id(p) not in inside and p.dim() == 2 and p.shape == (n_experts, HIDDEN)
    ]
    if len(found) != 1:
        raise RuntimeError(
            f"expected one router matrix in {type(moe).__name__}, found {len(found)}"
        )
    return found[0]


@contextmanager
def _masked_linear(masks: dict[int, Tensor], fired: list[int]) -> Iterator[None]:
    """While active, ``F.linear`` with one of the router weights (by storage) returns
    ``-inf`` at the masked experts (last axis)."""
    original = torch.nn.functional.linear

    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = original(x, weight, bias)
        mask = masks.get(weight.data_ptr())
        if mask is not None and weight.shape[0] == mask.numel():
            fired.append(1)
            out = out.masked_fill(mask.to(out.device), float("-inf"))
        return out

    torch.nn.functional.linear = linear  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.linear = original  # type: ignore[assignment]


def _tensor_named(module: nn.Module, name: str) -> Tensor:
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if n == name or n.endswith("." + name):
            return t
    raise RuntimeError(f"{type(module).__name__} has no tensor '{name}'")


@torch.no_grad()
def masked_original(model_type: str, full: nn.Module, keep: Sequence[Keep], ids: Tensor) -> Tensor:
    """Logits of ``full`` (not modified: a copy is masked) for ``ids`` ``[1, T]`` with every
    layer's removed experts excluded from routing and dropped neurons zeroed (module
    docstring)."""
    model = copy.deepcopy(full)
    blocks = model.model.layers
    masks: dict[int, Tensor] = {}
    kind = ROUTING[model_type]
    for block, layer in zip(blocks, keep, strict=True):
        found = _experts_module(block)
        if layer.experts is None:  # a dense layer
            (down,) = _down_linears(block, None)
            _zero_columns(down.weight, layer.neurons, axis=1)
            continue
        assert found is not None, "an MoE layer without fused experts"
        moe, experts = found
        n = experts.down_proj.shape[0]
        removed = torch.ones(n, dtype=torch.bool)
        removed[list(layer.experts)] = False
        transposed = bool(getattr(experts, "is_transposed", False))
        for expert, neurons in zip(layer.experts, layer.neurons, strict=True):
            _zero_columns(experts.down_proj[expert], neurons, axis=0 if transposed else 1)
        if layer.shared is not None:
            (down,) = _down_linears(moe, experts)
            _zero_columns(down.weight, layer.shared, axis=1)
        how, _, bias_name = kind.partition(":")
        if how in ("logits", "logits+bias"):
            masks[router_weight(moe, experts, n).data_ptr()] = removed
        if bias_name:
            bias = _tensor_named(moe, bias_name)
            bias.view(-1, n)[:, removed] = float("-inf")
    fired: list[int] = []
    with _masked_linear(masks, fired):
        logits = model(input_ids=ids).logits
    if masks and not fired:
        raise RuntimeError("the router never called F.linear with its weight; mask not applied")
    return logits


def _zero_columns(weight: Tensor, kept: Sequence[int] | Tensor, axis: int) -> None:
    drop = torch.ones(weight.shape[axis], dtype=torch.bool)
    drop[torch.as_tensor(kept, dtype=torch.long)] = False
    if axis == 0:
        weight[drop] = 0
    else:
        weight[:, drop] = 0
