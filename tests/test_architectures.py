"""Every causal-LM model_type of the installed transformers is either in the architecture table
(and prunes correctly on a tiny random model) or refused by ``spec_for`` with a one-line reason.

Run ``python tests/test_architectures.py`` to print the README's architecture lists from the
table (the README test below checks they match).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from griffin_export.core.architectures import ARCHITECTURES, MOE_ARCHITECTURES, REFUSED, spec_for
from griffin_export.core.slicing import prune_model
from griffin_export.errors import UnsupportedArchitectureError

from tiny import CONFIGS, random_ids, tiny_model

CAUSAL_LM_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
SUPPORTED = [t for t in CAUSAL_LM_TYPES if t in ARCHITECTURES and t not in MOE_ARCHITECTURES]
MOE_SUPPORTED = [t for t in CAUSAL_LM_TYPES if t in MOE_ARCHITECTURES]
REFUSED_TYPES = [t for t in CAUSAL_LM_TYPES if t in REFUSED]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_causal_lm_type_is_classified() -> None:
    """Each of transformers' causal-LM model types is in exactly one of the two tables.
    Catches a type added to transformers (or dropped from a table) that nobody looked at, and
    a type both supported and refused."""
    unclassified = [t for t in CAUSAL_LM_TYPES if t not in ARCHITECTURES and t not in REFUSED]
    assert not unclassified, f"classify these in griffin_export/architectures.py: {unclassified}"
    assert not set(ARCHITECTURES) & set(REFUSED)


@pytest.mark.parametrize("model_type", REFUSED_TYPES)
def test_refused_types_say_why_in_one_line(model_type: str) -> None:
    """Catches a refused type that slips through spec_for, or a reason lost or spread over
    several lines."""
    with pytest.raises(UnsupportedArchitectureError) as caught:
        spec_for(model_type)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{model_type}'" in message and REFUSED[model_type] in message


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_supported_type_prunes_like_masking_the_dropped_neurons(model_type: str) -> None:
    """A tiny random model of every supported type, pruned in memory to random half sets,
    gives the logits of the full model whose dropped down-projection inputs are zeroed.
    Catches a wrong row in the table: projection names, the neuron axis, fused halves, a
    size key the model does not read, or a layer path that misses blocks."""
    assert model_type in CONFIGS, f"add a tiny config for '{model_type}' to tests/tiny.py"
    spec = spec_for(model_type)
    full = tiny_model(model_type)
    d_ff = spec.d_ff(full.config)
    g = torch.Generator().manual_seed(7)
    blocks = spec.blocks(full)
    keep = [torch.sort(torch.randperm(d_ff, generator=g)[: d_ff // 2]).values for _ in blocks]
    for block, idx in zip(blocks, keep, strict=True):
        assert spec.down_module(block).weight.shape[spec.neuron_axis("down")] == d_ff
        mask = torch.zeros(d_ff).index_fill(0, idx, 1.0)
        spec.down_module(block).register_forward_pre_hook(
            lambda _m, a, mask=mask: (a[0] * mask, *a[1:])
        )
    pruned = tiny_model(model_type)
    prune_model(spec, pruned, keep)
    assert spec.d_ff(pruned.config) == d_ff // 2
    ids = random_ids(13, seed=3)[None]
    with torch.no_grad():
        want, got = full(input_ids=ids).logits, pruned(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_down_input_is_the_plain_ff_formula(model_type: str) -> None:
    """In every block the down projection's input equals ``act(gate(x)) * up(x)`` (GLU, fused
    halves gate first) or ``act(up(x))``, with ``act`` the module the table names: what the
    statistic scores and what the refresh runtime recomputes. Catches a row whose FF has
    extra terms (multipliers, norms, clamps) or whose ``act`` attribute is not the one used."""
    spec = spec_for(model_type)
    model = tiny_model(model_type)
    inputs: dict[str, list[torch.Tensor]] = {"x": [], "z": []}
    handles = []
    for block in spec.blocks(model):
        projections = spec.projections(block)
        first = projections["gate_up" if spec.fused_gate_up else "up"]
        handles.append(
            first.register_forward_pre_hook(lambda _m, a: inputs["x"].append(a[0].detach()))
        )
        handles.append(
            projections["down"].register_forward_pre_hook(
                lambda _m, a: inputs["z"].append(a[0].detach())
            )
        )
    with torch.no_grad():
        model(input_ids=random_ids(11, seed=4)[None])
        for handle in handles:
            handle.remove()
        for block, x, z in zip(spec.blocks(model), inputs["x"], inputs["z"], strict=True):
            p = spec.projections(block)
            act = getattr(spec.mlp_module(block), spec.act)
            if spec.fused_gate_up:
                gate, up = p["gate_up"](x).chunk(2, dim=-1)
                want = act(gate) * up
            elif spec.gate is not None:
                want = act(p["gate"](x)) * p["up"](x)
            else:
                want = act(p["up"](x))
            torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)


def readme_section() -> str:
    """The README's lists of supported and refused model types, from the tables."""
    reasons: dict[str, list[str]] = {}
    for model_type in REFUSED_TYPES:
        reasons.setdefault(REFUSED[model_type], []).append(model_type)
    lines = [
        f"Supported ({len(SUPPORTED)}): " + ", ".join(f"`{t}`" for t in SUPPORTED) + ".",
        "",
        f"Mixtures of experts ({len(MOE_SUPPORTED)}): "
        + ", ".join(f"`{t}`" for t in MOE_SUPPORTED)
        + ".",
        "",
        f"Refused ({len(REFUSED_TYPES)}), by reason:",
        "",
    ]
    for reason, types in sorted(reasons.items(), key=lambda item: -len(item[1])):
        lines.append(f"- {reason}: " + ", ".join(f"`{t}`" for t in types) + ".")
    return "\n".join(lines)


def test_readme_lists_match_the_table() -> None:
    """Catches a README that drifts from the table (a row added or a refusal moved)."""
    text = README.read_text()
    found = re.search(
        r"<!-- architectures:begin -->\n(.*?)\n<!-- architectures:end -->", text, re.S
    )
    assert found, "README.md lacks the <!-- architectures:begin/end --> markers"
    assert found.group(1).strip() == readme_section(), (
        "regenerate with: .venv/bin/python tests/test_architectures.py"
    )


if __name__ == "__main__":
    print(readme_section())
