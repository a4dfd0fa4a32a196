"""The refresh runtime on mixture-of-experts exports: after refreshes every live slot holds
the original's expert that the live map names, sliced at the live neurons, with its router
row, in the storage it had; a removed expert that takes the routing mass is swapped in;
generation continues on the KV cache; ``reset`` restores the export; ``griffin generate``
runs on an MoE export.

Tiny models are built here (mixtral; qwen2_moe with a shared expert and a dense layer 0)
until tests/tiny_moe.py lands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import griffin_export.runtime.refresh as refresh_mod
from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.core.compensation import GramStats, refit_stored
from griffin_export.core.moe import dense_spec, experts_of, is_moe_layer, router_of, shared_spec
from griffin_export.core.moe_selection import (
    RoutedInputs,
    capture_moe_inputs,
    route_tokens,
)
from griffin_export.runtime.refresh import GriffinRuntime, swap_experts

from tiny import char_tokenizer

PROMPT = "The river runs to the sea, and the sea returns as rain over the hills. " * 2
TEXT = "Rain and rivers, hills and seas"
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 16, "num_local_experts": 8},
    "qwen2_moe": {
        "intermediate_size": 24,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 8,
        "mlp_only_layers": [0],
    },
}


def save_moe(model_type: str, path: Path, layers: int = 3, **extra: Any) -> Path:
    """A tiny random MoE model of ``model_type`` with its tokenizer, saved to ``path``."""
    tok = char_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=2,
        vocab_size=len(tok),
        **{**CONFIGS[model_type], **extra},
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rtmoe")
    made = {}
    for name, model_type, layers, extra, compensate in [
        ("mixtral", "mixtral", 3, {}, "none"),
        ("qwen2_moe", "qwen2_moe", 3, {}, "none"),
        ("qwen2_moe-refit", "qwen2_moe", 3, {}, "refit"),
        ("mixtral-1", "mixtral", 1, {}, "none"),
        ("qwen2_moe-1", "qwen2_moe", 1, {"mlp_only_layers": []}, "none"),
    ]:
        src = save_moe(model_type, root / f"{name}-src", layers, **extra)
        out = root / f"{name}-exp"
        export(str(src), [PROMPT], ratio=0.5, experts=0.5, out=out, compensate=compensate)
        made[name] = (src, out)
    return made


def _ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def _expert_slice(experts: torch.nn.Module, expert: int, neurons: torch.Tensor) -> tuple[Any, Any]:
    """Expert ``expert``'s gate/up and down slabs at ``neurons``, by plain indexing of the
    stock-loaded original (``[gate; up]`` rows ``[2I, H]``, down ``[H, I]``)."""
    assert experts.is_concatenated and not experts.is_transposed and not experts.has_bias
    width = experts.down_proj.shape[-1]
    rows = torch.cat([neurons, neurons + width])
    return experts.gate_up_proj[expert][rows], experts.down_proj[expert][:, neurons]


def _check_live_weights(runtime: GriffinRuntime, src: Path) -> int:
    """Every live FF tensor equals the stock-loaded original's at the live maps; returns the
    number of MoE layers checked."""
    spec = spec_for(runtime.model.config.model_type)
    original = AutoModelForCausalLM.from_pretrained(src)
    checked = 0
    for layer, (live, full) in enumerate(
        zip(spec.blocks(runtime.model), spec.blocks(original), strict=True)
    ):
        if not is_moe_layer(spec, full):  # a dense layer: the dense runtime's slicing
            _check_dense(dense_spec(spec), live, full, runtime.slots[layer])
            continue
        state = runtime.moe[layer]
        assert len(set(state.experts.tolist())) == len(state.experts)  # a map, no duplicates
        live_experts, full_experts = experts_of(spec, live), experts_of(spec, full)
        for slot, expert in enumerate(state.experts.tolist()):
            gate_up, down = _expert_slice(full_experts, expert, state.neurons[slot])
            assert torch.equal(live_experts.gate_up_proj[slot], gate_up), (layer, slot)
            assert torch.equal(live_experts.down_proj[slot], down), (layer, slot)
        full_rows = router_of(spec, full).weight[state.experts]
        assert torch.equal(router_of(spec, live).weight, full_rows)
        shared = shared_spec(spec)
        if shared is not None:
            _check_dense(shared, live, full, runtime.slots[layer])
        checked += 1
    return checked


def _stock(src: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(src)


def _plain_statistic(experts: Any, expert: int, x: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's statistic of one expert on tokens ``x``, by hand: ``z = silu(gate x) * up x``,
    each token's ``z`` normalised, ``sqrt`` of the per-neuron sum of squares."""
    width = experts.down_proj.shape[-1]
    slab = experts.gate_up_proj[expert].detach()
    z = torch.nn.functional.silu(x @ slab[:width].T) * (x @ slab[width:].T)
    z = z / z.norm(dim=-1, keepdim=True)
    return z.pow(2).sum(0).sqrt()


def _check_dense(spec: Any, live: torch.nn.Module, full: torch.nn.Module, slots: Any) -> None:
    for role, module in spec.projections(live).items():
        want = spec.projections(full)[role].weight.index_select(spec.neuron_axis(role), slots)
        assert torch.equal(module.weight, want), role


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_live_slots_hold_the_mapped_experts_sliced_at_the_live_neurons(
    name: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    """After refreshes that swapped experts and moved neurons, every slot of every MoE layer
    equals the stock-loaded original's expert (the one the live map says sits there) at the
    live neurons, the router's rows are the original's rows of those experts, the shared
    expert and the dense layer equal the original at their slots, and no live tensor was
    reallocated (same data_ptr). Catches: a slice taken from the slot's index instead of the
    original expert's, a swap that leaves the router row (or the down slab) of the old
    expert, neurons chosen but not copied, a map updated without the weights or the reverse,
    and writes that replace the parameters instead of copying into them."""
    src, out = exports[name]
    runtime = GriffinRuntime.from_export(out)
    before = _ptrs(runtime.model)
    result = runtime.generate(TEXT, 40, refresh_every=6, window=12, stop_at_eos=False)
    assert len(result.refreshes) >= 5
    assert sum(e.total_swapped for e in result.refreshes) > 0  # whole experts did move
    assert sum(e.total_changed for e in result.refreshes) > 0
    assert _check_live_weights(runtime, src) == (3 if name == "mixtral" else 2)
    assert _ptrs(runtime.model) == before


def test_route_tokens_is_what_the_full_models_experts_receive(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """``route_tokens`` on a layer's MoE inputs returns the routing the experts module gets
    in a real forward of the full model (captured by the export's own hook). Catches routing
    recomputed by hand (missing renormalisation, softmax vs. top-k order) and tokens
    reshaped out of order."""
    src, _ = exports["qwen2_moe"]
    model = AutoModelForCausalLM.from_pretrained(src)
    spec = spec_for("qwen2_moe")
    seen: dict[int, RoutedInputs] = {}
    inputs: dict[int, torch.Tensor] = {}
    blocks = spec.blocks(model)
    hooks = [
        blocks[layer].mlp.register_forward_pre_hook(
            lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0])
        )
        for layer in (1, 2)
    ]
    ids = char_tokenizer()(TEXT, return_tensors="pt")["input_ids"]

    def sink(layer: int, x: Any) -> None:
        if isinstance(x, RoutedInputs):
            seen[layer] = x

    with torch.no_grad(), capture_moe_inputs(spec, model, sink):
        model(ids)
    for hook in hooks:
        hook.remove()
    for layer in (1, 2):
        got = route_tokens(spec, blocks[layer].mlp, inputs[layer].reshape(-1, 32))
        assert torch.equal(got.index, seen[layer].index.reshape(got.index.shape))
        assert torch.equal(got.weights, seen[layer].weights.reshape(got.weights.shape))


def _forced_routing(layer_total: int, experts: tuple[int, int]) -> Any:
    """A stand-in for ``route_tokens`` that sends every token to ``experts`` (weights 0.7 and
    0.3): the forced situation where removed experts carry all the routing mass."""
    real = route_tokens

    def forced(spec: Any, block: Any, x: torch.Tensor) -> RoutedInputs:
        routed = real(spec, block, x)
        index = torch.tensor(experts).expand_as(routed.index).clone()
        weights = torch.tensor([0.7, 0.3], dtype=routed.weights.dtype).expand_as(index).clone()
        assert routed.index.max() < layer_total
        return RoutedInputs(routed.hidden, index, weights)

    return forced


@pytest.mark.parametrize("name", ["mixtral-1", "qwen2_moe-1"])
def test_a_removed_expert_with_all_the_mass_is_swapped_in_and_decoding_continues_on_the_cache(
    name: str, exports: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the full routing forced to send every window token to two removed experts, the
    first refresh swaps both into the slots of kept experts (the rest of the map unchanged),
    with their weights and router rows. On a one-layer model the KV cache does not depend on
    the FF weights, so every logit the runtime computes with its cache after that refresh
    equals a from-scratch forward of the swapped model on the same tokens. Catches: no swap
    when a removed expert outweighs a kept one, a swap into two slots or the wrong one,
    re-prefilling or a stale routing after a swap (the pruned block would still route to
    the old experts' rows), and weights written after the forward that should use them.
    The swapped-in experts' neurons are the top ``I'`` of the statistic (by hand, on the
    stock original) over the window, and the kept experts, to which the full routing sent no
    token, keep theirs: catches neurons left as the previous expert's and neurons chosen
    from the pruned model's routing (which sends every token to kept experts)."""
    src, out = exports[name]
    runtime = GriffinRuntime.from_export(out)
    state = runtime.moe[0]
    exported = state.experts.clone()
    removed = [e for e in range(state.total) if e not in set(exported.tolist())]
    forced = (removed[-1], removed[0])
    monkeypatch.setattr(refresh_mod, "route_tokens", _forced_routing(state.total, forced))
    logits: list[torch.Tensor] = []
    moe_inputs: list[torch.Tensor] = []
    hooks = [
        runtime.model.register_forward_hook(
            lambda _m, _a, out: logits.append(out.logits[0, -1].clone())
        ),
        state.live.register_forward_pre_hook(
            lambda _m, args: moe_inputs.append(args[0].reshape(-1, args[0].shape[-1]).clone())
        ),
    ]
    before = _ptrs(runtime.model)
    try:
        result = runtime.generate(TEXT, 12, refresh_every=8, window=8, stop_at_eos=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.refreshes[0].swapped == [2]
    after = state.experts
    assert set(forced) <= set(after.tolist())
    assert int((after != exported).sum()) == 2  # two slots rewritten, the others kept
    # the window: the last 8 MoE inputs before the refresh (prefill, then tokens 0..6)
    window = torch.cat(moe_inputs[:8])[-8:]
    full = experts_of(spec_for(runtime.model.config.model_type), _stock(src).model.layers[0])
    for slot, expert in enumerate(after.tolist()):
        if expert in forced:  # every window token went to it: its neurons are the statistic's
            width = state.neurons.shape[1]
            want = torch.sort(_plain_statistic(full, expert, window).topk(width).indices).values
            assert torch.equal(state.neurons[slot], want), expert
        else:  # no window token went to it under the full routing: neurons as exported
            assert torch.equal(state.neurons[slot], state._export[1][slot])
    assert _check_live_weights(runtime, src) == 1
    assert _ptrs(runtime.model) == before
    ids = char_tokenizer()(TEXT)["input_ids"] + result.token_ids
    with torch.no_grad():
        fresh = runtime.model(torch.tensor([ids])).logits[0]
    prompt = len(ids) - len(result.token_ids)
    # forward k (k >= 8) of the decode ran after the refresh at 8 and predicts token k
    for k in range(8, len(result.token_ids)):
        torch.testing.assert_close(logits[k], fresh[prompt + k - 1], atol=1e-5, rtol=1e-5)


def test_swap_rule_keeps_the_heaviest_experts_per_group() -> None:
    """``swap_experts`` leaves, per routing group, the experts of largest mass (distinct
    masses), each new one in a slot of its group whose previous expert it outweighs, and a
    kept expert in place when no removed one outweighs it. Oracle: a sort per group. Catches
    a single swap per refresh, swaps across groups (uneven groups break group routing), and
    >= instead of > (swapping equal masses back and forth)."""
    generator = torch.Generator().manual_seed(3)
    for groups in (1, 2, 4):
        for _ in range(20):
            mass = torch.rand(16, generator=generator)
            mass[torch.rand(16, generator=generator) < 0.3] = 0  # unrouted experts
            per = 4 // groups
            size = 16 // groups
            live = torch.cat(
                [torch.randperm(size, generator=generator)[:per] + g * size for g in range(groups)]
            )
            got = swap_experts(live, mass, groups)
            for g in range(groups):
                members = [int(e) for e in got if int(e) // size == g]
                assert len(members) == per
                ranked = sorted(range(g * size, (g + 1) * size), key=lambda e: -float(mass[e]))
                floor = float(mass[ranked[per - 1]])
                assert all(float(mass[e]) >= floor for e in members)
            for slot, (old, new) in enumerate(zip(live.tolist(), got.tolist(), strict=True)):
                if old != new:
                    assert float(mass[new]) > float(mass[old]), slot
    tie = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.equal(swap_experts(torch.tensor([1, 2]), tie), torch.tensor([1, 0]))
    same = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert torch.equal(swap_experts(torch.tensor([2, 3]), same), torch.tensor([2, 3]))


def test_reset_restores_the_exported_experts_and_their_refitted_down(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """After a run that swapped experts, ``reset`` puts every live tensor back to the export's
    own (its files, loaded stock), the refitted down slabs of a compensated export included,
    and the maps to the export's; a second ``generate`` repeats the first. Catches a reset
    that rewrites experts but not router rows, forgets the refitted down projections (it
    would write plain slices), or resets only the dense layers."""
    _, out = exports["qwen2_moe-refit"]
    runtime = GriffinRuntime.from_export(out, refit_on_refresh=False)
    first = runtime.generate(TEXT, 16, refresh_every=4, window=8, stop_at_eos=False)
    assert sum(e.total_swapped for e in first.refreshes) > 0
    assert runtime.reset() > 0
    stock = AutoModelForCausalLM.from_pretrained(out)
    live = dict(runtime.model.named_parameters())
    for key, value in stock.named_parameters():
        assert torch.equal(live[key], value), key
    again = runtime.generate(TEXT, 16, refresh_every=4, window=8, stop_at_eos=False)
    assert again.token_ids == first.token_ids


def test_refit_on_refresh_refits_experts_with_enough_window_tokens(
    exports: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a compensated export with ``refit_on_refresh``, forced routing sends all 16 window
    tokens (>= MIN_REFIT_TOKENS) to two removed experts: after the swap their gate/up are the
    plain slices and their down slabs the ridge refit of the original's expert on exactly
    those tokens' activations (by hand here, fitted by the library's ``refit_stored``); the
    kept experts, which got no token, keep the export's own (prompt-refitted) down slabs.
    Catches the refit skipped for experts, fitted on the wrong expert's slab or neurons or on
    every window token's activations of another expert, and a refit or a plain slice
    overwriting experts the window did not reach."""
    src, out = exports["qwen2_moe-refit"]
    spec = spec_for("qwen2_moe")
    runtime = GriffinRuntime.from_export(out, refit_on_refresh=True)
    assert runtime.refit_on_refresh and runtime.compensation is not None
    state = runtime.moe[2]
    exported = state.experts.clone()
    live = experts_of(spec, spec.blocks(runtime.model)[2])
    exported_down = live.down_proj.detach().clone()
    removed = [e for e in range(state.total) if e not in set(exported.tolist())]
    forced = (removed[0], removed[1])
    monkeypatch.setattr(refresh_mod, "route_tokens", _forced_routing(state.total, forced))
    moe_inputs: list[torch.Tensor] = []
    hook = state.live.register_forward_pre_hook(
        lambda _m, args: moe_inputs.append(args[0].reshape(-1, args[0].shape[-1]).clone())
    )
    try:
        runtime.generate(TEXT, 9, refresh_every=8, window=16, stop_at_eos=False)
    finally:
        hook.remove()
    window = torch.cat(moe_inputs[:8])[-16:]
    full = experts_of(spec, _stock(src).model.layers[2])
    width = full.down_proj.shape[-1]
    for slot, expert in enumerate(state.experts.tolist()):
        neurons = state.neurons[slot]
        gate_up, down = _expert_slice(full, expert, neurons)
        assert torch.equal(live.gate_up_proj[slot], gate_up)
        if expert not in forced:
            assert torch.equal(live.down_proj[slot], exported_down[slot])
            continue
        slab = full.gate_up_proj[expert].detach()
        z = torch.nn.functional.silu(window @ slab[:width].T) * (window @ slab[width:].T)
        stats = GramStats.zeros(width, z.device)
        stats.add(z)
        want = refit_stored(
            full.down_proj[expert].detach(), neurons, stats, runtime.compensation, False
        )
        assert not torch.equal(want.weight, down)  # the refit is not the plain slice
        torch.testing.assert_close(live.down_proj[slot], want.weight, atol=1e-5, rtol=1e-4)


def test_griffin_generate_on_an_moe_export(exports: dict[str, tuple[Path, Path]]) -> None:
    """``griffin generate`` streams text from an MoE export, reports expert swaps, and its
    ``--json --events full`` result lists per refresh the live map of every MoE layer (a
    dense layer: ``[]``) with the swap counts. Catches the CLI building the dense runtime on
    an MoE export (it has no per-layer gate_proj) and events without the MoE fields."""
    _, out = exports["qwen2_moe"]
    args = ["generate", "-m", str(out), "-t", TEXT, "-n", "12", "--refresh", "4", "-W", "8"]
    streamed = CliRunner().invoke(app, args)
    assert streamed.exit_code == 0, streamed.output
    assert "expert swaps" in streamed.output
    result = CliRunner().invoke(app, [*args, "--json", "--events", "full"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    event = data["refreshes"][0]
    assert event["experts"][0] == []
    assert all(len(event["experts"][layer]) == 4 for layer in (1, 2))
    assert len(event["swapped"]) == 3 and event["swapped"][0] == 0
