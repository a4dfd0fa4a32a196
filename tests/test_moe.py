"""Mixture-of-experts families: every row of ``MOE_ARCHITECTURES`` prunes a tiny random model
(chosen experts and neurons, sliced, config edited, saved) into a checkpoint stock
``from_pretrained`` reloads with the logits of the masked original (tests/tiny_moe.py); and
the pure parts of the MoE core against plain loops."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_moe import CONFIGS, EXPERTS, TOP_K, WIDTH, Keep, masked_original, tiny_moe_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from griffin_export.core.architectures import MOE_ARCHITECTURES, spec_for
from griffin_export.core.moe import (
    check_expert_count,
    expert_hidden,
    expert_output,
    experts_of,
    is_moe_layer,
    router_weight,
    shared_present,
    shared_spec,
    shared_width_of,
)
from griffin_export.core.moe_selection import (
    MoeLayerChoice,
    choose_routed,
    plan_moe_sizes,
    prune_moe_model,
    select_moe,
)
from griffin_export.errors import UsageError

from tiny import loop_statistic, plain_top_k

FAMILIES = sorted(MOE_ARCHITECTURES)
#: one family per routing kind and experts layout, run in the quick suite; the rest are `slow`
#: (about 2 s each, 37 of them)
QUICK = {
    "mixtral",  # softmax then top-k
    "granitemoe",  # top-k then softmax, its own module names
    "gpt_oss",  # interleaved, transposed, biases, a router bias
    "aria_text",  # transposed, concatenated; shared width = count x routed width
    "qwen2_moe",  # a shared expert with its own width field and gate; a dense layer
    "deepseek_v3",  # sigmoid + selection bias, group-limited; dense layer, shared experts
    "ernie4_5_moe",  # softmax + selection bias
    "afmoe",  # the selection bias on the MoE module, the router weight inside a Linear
    "minimax_m3_vl_text",  # fused gate/up dense layers and shared expert under their own keys
}
FAMILY_PARAMS = [pytest.param(t, marks=() if t in QUICK else pytest.mark.slow) for t in FAMILIES]


def _prompt(n: int = 48, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (n,), generator=g)


def _keeps(selection: Any) -> list[Keep]:
    out = []
    for choice in selection.layers:
        if isinstance(choice, MoeLayerChoice):
            shared = None if choice.shared is None else choice.shared.tolist()
            out.append(Keep(choice.neurons.tolist(), choice.experts.tolist(), shared))
        else:
            out.append(Keep(choice.tolist()))
    return out


def test_every_moe_row_has_a_tiny_model() -> None:
    """Catches a row added to the table that no test below exercises (no tiny config)."""
    assert set(FAMILIES) == set(CONFIGS)


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_family_reloads_with_the_masked_originals_logits(model_type: str, tmp_path: Path) -> None:
    """A tiny model pruned to half its experts and half their neurons (and half of every dense
    layer's and shared expert's), saved and reloaded by stock ``from_pretrained``, gives the
    full model's logits with the removed experts excluded from routing and the dropped neurons
    zeroed; the config states the kept sizes under the family's keys. Catches a row naming the
    wrong router, router tensor (a selection bias left unsliced routes to the wrong experts),
    shared expert or config key (the reload then fails, or rebuilds full-size modules), a
    layout flag misread (gate/up halves or the transposed slab sliced on the wrong axis), and a
    dense layer pruned under the routed experts' width."""
    spec = spec_for(model_type)
    moe = spec.moe
    assert moe is not None
    model = tiny_moe_model(model_type)
    full = copy.deepcopy(model)
    ids = _prompt()[None]
    keep_all = [
        Keep(list(range(WIDTH)))
        if not is_moe_layer(spec, b)
        else Keep([list(range(WIDTH))] * EXPERTS, list(range(EXPERTS)))
        for b in spec.blocks(full)
    ]
    for layer, block in zip(keep_all, spec.blocks(full), strict=True):
        if layer.experts is None:
            layer.neurons = list(range(spec.d_ff(full.config)))
        elif shared_present(spec, block):
            layer.shared = list(range(shared_width_of(spec, block)))
    with torch.no_grad():
        # the oracle with nothing removed is the full model: its masking is the only change
        torch.testing.assert_close(
            masked_original(model_type, full, keep_all, ids), full(input_ids=ids).logits
        )

    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    selection = select_moe(spec, model, [_prompt(seed=2)], sizes)
    prune_moe_model(spec, model, selection)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    config = reloaded.config
    assert getattr(config, moe.count_key) == EXPERTS // 2
    assert getattr(config, moe.width_key) == WIDTH // 2
    if sizes.dense is not None:
        assert spec.d_ff(config) == sizes.dense
    for block in spec.blocks(reloaded):
        if not is_moe_layer(spec, block):
            assert sizes.dense is not None
            assert spec.down_module(block).weight.shape[1] == sizes.dense
            continue
        experts = experts_of(spec, block)
        transposed = bool(getattr(experts, "is_transposed", False))
        assert experts.down_proj.shape[0] == EXPERTS // 2
        assert experts.down_proj.shape[2 if not transposed else 1] == WIDTH // 2
        assert router_weight(spec, block).shape[0] == EXPERTS // 2
        shared = shared_spec(spec)
        if shared is not None and shared_present(spec, block):
            assert shared.down_module(block).weight.shape[1] == sizes.shared
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    want = masked_original(model_type, full, _keeps(selection), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- one expert's computation -------------------------------------------------------------------
def _hand_hidden(experts: nn.Module, e: int, x: Tensor, layout: str) -> Tensor:
    """One expert's down-projection input written out per layout, from the raw slabs."""
    width = experts.down_proj.shape[2] if layout == "concatenated" else experts.down_proj.shape[1]
    if layout == "concatenated":  # [2I, H], gate rows first
        w = experts.gate_up_proj[e]
        return experts.act_fn(x @ w[:width].T) * (x @ w[width:].T)
    if layout == "transposed":  # [H, 2I], gate columns first
        w = experts.gate_up_proj[e]
        return experts.act_fn(x @ w[:, :width]) * (x @ w[:, width:])
    # gpt-oss: [H, 2I] interleaved (gate 2j, up 2j + 1) with a bias, clamped SwiGLU
    w, b = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]
    gate = (x @ w[:, 0::2] + b[0::2]).clamp(max=experts.limit)
    up = (x @ w[:, 1::2] + b[1::2]).clamp(min=-experts.limit, max=experts.limit)
    return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)


def _first_experts(model_type: str) -> nn.Module:
    """The fused experts module of the first MoE layer of a tiny ``model_type``."""
    spec = spec_for(model_type)
    model = tiny_moe_model(model_type)
    return experts_of(spec, next(b for b in spec.blocks(model) if is_moe_layer(spec, b)))


@pytest.mark.parametrize(
    ("model_type", "layout"),
    [("mixtral", "concatenated"), ("aria_text", "transposed"), ("gpt_oss", "interleaved")],
)
def test_expert_hidden_is_the_hand_computation(model_type: str, layout: str) -> None:
    """``expert_hidden`` equals the activations written out from the raw slabs for each
    layout. Catches gate/up halves swapped, interleaved read as concatenated (gpt-oss), a
    transposed slab multiplied the wrong way, and a dropped gate/up bias."""
    experts = _first_experts(model_type)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for e in (0, 5):
            torch.testing.assert_close(
                expert_hidden(experts, e, x), _hand_hidden(experts, e, x, layout)
            )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_expert_is_what_the_experts_module_computes(model_type: str) -> None:
    """``expert_output(expert_hidden(x))`` equals the family's own experts module routing
    every token to that one expert with weight 1. Catches a family whose layout flags or
    activation griffin misreads (REAP and the refit would then score the wrong outputs)."""
    experts = _first_experts(model_type)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for e in (1, EXPERTS - 1):
            index = torch.full((6, 1), e)
            want = experts(x, index, torch.ones(6, 1))
            got = expert_output(experts, e, expert_hidden(experts, e, x))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- selection against plain loops --------------------------------------------------------------
def _routed_inputs(spec: Any, model: nn.Module, ids: Tensor) -> dict[int, tuple[Tensor, ...]]:
    """Per MoE layer what its experts module received in one forward of the full model."""
    seen: dict[int, tuple[Tensor, ...]] = {}
    handles = []
    for layer, block in enumerate(spec.blocks(model)):
        if is_moe_layer(spec, block):
            handles.append(
                experts_of(spec, block).register_forward_pre_hook(
                    lambda _m, a, layer=layer: seen.__setitem__(
                        layer, tuple(t.detach().clone() for t in a[:3])
                    )
                )
            )
    with torch.no_grad():
        model(input_ids=ids[None])
    for handle in handles:
        handle.remove()
    return seen


def test_reap_importance_and_per_expert_statistic_are_plain_loops() -> None:
    """Per MoE layer, each expert's importance is the sum over (token, slot) routed to it of
    the routing weight times the norm of the expert's output for that token (computed one
    token at a time by the experts module itself), and each kept expert's neurons are the top
    GRIFFIN statistic over only its own routed tokens. Catches importance summed over all
    tokens, a missing routing weight, a squared norm, and per-expert sums mixed across experts
    (e.g. every expert scored on the layer's tokens)."""
    spec = spec_for("qwen3_moe")
    model = tiny_moe_model("qwen3_moe")
    ids = _prompt(40, seed=5)
    inputs = _routed_inputs(spec, model, ids)
    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    selection = select_moe(spec, model, [ids], sizes)
    for layer, (hidden, index, weights) in inputs.items():
        block = spec.blocks(model)[layer]
        experts = experts_of(spec, block)
        choice = selection.layers[layer]
        assert isinstance(choice, MoeLayerChoice)
        importance = [0.0] * EXPERTS
        rows: list[list[list[float]]] = [[] for _ in range(EXPERTS)]
        with torch.no_grad():
            for t in range(hidden.shape[0]):
                for s in range(index.shape[1]):
                    e = int(index[t, s])
                    y = experts(hidden[t : t + 1], torch.tensor([[e]]), torch.ones(1, 1))
                    importance[e] += float(weights[t, s]) * math.sqrt(
                        sum(v * v for v in y[0].tolist())
                    )
                    w = experts.gate_up_proj[e]
                    x = hidden[t]
                    z = experts.act_fn(w[:WIDTH] @ x) * (w[WIDTH:] @ x)
                    rows[e].append(z.tolist())
        want = torch.tensor(importance, dtype=torch.float64)
        torch.testing.assert_close(choice.importance.double(), want, rtol=1e-4, atol=1e-6)
        for e, neurons in zip(choice.experts.tolist(), choice.neurons.tolist(), strict=True):
            assert rows[e], "a kept expert without routed tokens in this prompt"
            assert neurons == plain_top_k(loop_statistic(rows[e]), WIDTH // 2)


def test_choose_routed_fills_unrouted_places_by_router_probability() -> None:
    """Routed experts rank by importance above every unrouted one; unrouted ones fill the
    remaining places by router probability; with groups every contiguous group keeps the same
    number. Catches filling by index or importance (zero for all unrouted), an unrouted expert
    with high probability outranking a routed one, and groups ignored."""
    importance = torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0])
    routed = importance > 0
    prob = torch.tensor([0.9, 0.01, 0.3, 0.01, 0.5, 0.05, 0.01, 0.2])
    kept, filled = choose_routed(importance, prob, routed, 5)
    order = sorted(
        range(8),
        key=lambda e: (
            not bool(routed[e]),
            -float(importance[e]) if routed[e] else -float(prob[e]),
        ),
    )
    assert kept.tolist() == sorted(order[:5])
    assert filled == sorted(e for e in order[:5] if not routed[e])
    kept, _ = choose_routed(importance, prob, routed, 4, groups=2)
    want = []
    for g in range(2):
        members = range(4 * g, 4 * g + 4)
        want += sorted(members, key=lambda e: order.index(e))[:2]
    assert kept.tolist() == sorted(want)


def _plain_valid(total: int, top_k: int, groups: int, topk_group: int) -> list[int]:
    """Kept counts a router can run with, from the routing rules written out."""
    out = []
    for keep in range(1, total + 1):
        each = keep / groups
        even = each == int(each) and each >= (2 if groups > 1 else 1)
        if keep >= top_k and even and topk_group * int(each) >= top_k:
            out.append(keep)
    return out


@pytest.mark.parametrize(
    ("model_type", "overrides", "bad"),
    [
        ("mixtral", {}, 1),
        ("deepseek_v3", dict(n_group=2, topk_group=1), 5),
        ("deepseek_v3", dict(n_group=2, topk_group=1), 2),
    ],
)
def test_check_expert_count_refuses_with_the_working_values(
    model_type: str, overrides: dict[str, Any], bad: int
) -> None:
    """Fewer kept experts than top-k, or a count the routing groups cannot split evenly (>= 2
    per group for the top-2 group score), is refused in one line that lists exactly the
    ``--experts`` fractions that work; those all pass. Catches a check that lets an
    un-routable count through (transformers then fails or routes to missing experts) and a
    message listing values that do not work."""
    spec = spec_for(model_type)
    config = tiny_moe_model(model_type, **overrides).config
    groups = overrides.get("n_group", 1)
    valid = _plain_valid(EXPERTS, TOP_K, groups, overrides.get("topk_group", groups))
    assert bad not in valid
    with pytest.raises(UsageError) as caught:
        check_expert_count(spec, config, bad)
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(", ".join(f"{n / EXPERTS:g}" for n in valid))
    for keep in valid:
        check_expert_count(spec, config, keep)
