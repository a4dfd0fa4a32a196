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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UnsupportedArchitectureError

#: Roles of FF projections. Input projections have one row (or column) per neuron.
INPUT_ROLES = ("gate", "up", "gate_up")


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
    # Phi-3: gate and up fused in one projection, gate rows first.
    "phi3": ArchSpec(
        layers="model.layers",
        mlp="mlp",
        up="gate_up_proj",
        down="down_proj",
        fused_gate_up=True,
        act="activation_fn",
    ),
    # Phi-1/2: plain fc1 -> GELU -> fc2 with biases.
    "phi": ArchSpec(layers="model.layers", mlp="mlp", up="fc1", down="fc2", act="activation_fn"),
    # StarCoder2: c_fc -> GELU -> c_proj as nn.Linear (not Conv1D).
    "starcoder2": ArchSpec(layers="model.layers", mlp="mlp", up="c_fc", down="c_proj", act="act"),
    # GPT-2: Conv1D stores [in, out]; n_inner=None means 4 * n_embd.
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp="mlp",
        up="c_fc",
        down="c_proj",
        transposed=True,
        size_key="n_inner",
        size_default_factor=4,
        act="act",
    ),
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
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp="mlp",
        up="fc_in",
        down="fc_out",
        size_key="n_inner",
        size_default_factor=4,
        act="act",
    ),
}


def spec_for(model_type: str) -> ArchSpec:
    """The table entry for ``model_type``, or an error listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported; supported: {supported}. "
            "Adding one is a row in griffin_export/architectures.py"
        ) from None
