"""The refresh runtime on mixture-of-experts exports: after refreshes every live slot holds
the original's expert that the live map names, sliced at the live neurons, with its router
row, in the storage it had; a removed expert that takes the routing mass is swapped in;
generation continues on the KV cache; ``reset`` restores the export; ``griffin generate``
runs on an MoE export.

Tiny models: tests/tiny_moe.py (block 0 dense and a shared expert where the family has
them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_moe import _experts_module, save_tiny_moe
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import griffin_export.runtime.refresh as refresh_mod
from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.core.compensation import GramStats, refit_stored
from griffin_export.core.moe import dense_spec, experts_of, is_moe_layer, shared_spec
from griffin_export.core.moe_selection import (
    RoutedInputs,
    capture_moe_inputs,
    route_tokens,
)
from griffin_export.errors import OriginalMismatchError
from griffin_export.runtime.refresh import GriffinRuntime, swap_experts

from tiny import char_tokenizer

PROMPT = "The river runs to the sea, and the sea returns as rain over the hills. " * 2
TEXT = "Rain and rivers, hills and seas"
#: the live-slot test's families: softmax top-k (mixtral), a shared expert and a dense layer
#: (qwen2_moe), group routing with a router selection bias (deepseek_v3), a selection bias on
#: the MoE module (minimax_m2), transposed interleaved experts with biases (gpt_oss)
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "minimax_m2", "gpt_oss"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rtmoe")
    one_layer: dict[str, Any] = {"num_hidden_layers": 1, "mlp_only_layers": []}
    made = {}
    for name, model_type, overrides, compensate in [
        *[(family, family, {}, "none") for family in FAMILIES],
        ("qwen2_moe-refit", "qwen2_moe", {}, "refit"),
        ("mixtral-1", "mixtral", one_layer, "none"),
        ("qwen2_moe-1", "qwen2_moe", one_layer, "none"),
    ]:
        src = save_tiny_moe(model_type, root / f"{name}-src", **overrides)
        out = root / f"{name}-exp"
        export(str(src), [PROMPT], ratio=0.5, experts=0.5, out=out, compensate=compensate)
        made[name] = (src, out)
    return made


def _ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def _expert_slice(experts: torch.nn.Module, expert: int, neurons: torch.Tensor) -> list[Any]:
    """Expert ``expert``'s tensors at ``neurons`` (gate/up, down, and their biases if any),
    by plain indexing of the stock-loaded original, from the module's own layout flags."""
    transposed = experts.is_transposed
    width = experts.down_proj.shape[1 if transposed else 2]
    if experts.is_concatenated:  # [gate; up]
        rows = torch.cat([neurons, neurons + width])
    else:  # gate 2j, up 2j + 1
        rows = torch.stack([2 * neurons, 2 * neurons + 1], dim=1).reshape(-1)
    gate_up, down = experts.gate_up_proj[expert], experts.down_proj[expert]
    out = [gate_up[:, rows] if transposed else gate_up[rows]]
    out.append(down[neurons] if transposed else down[:, neurons])
    if experts.has_bias:
        out += [experts.gate_up_proj_bias[expert][rows], experts.down_proj_bias[expert]]
    return out


def _live_slot(experts: torch.nn.Module, slot: int) -> list[Any]:
    names = ["gate_up_proj", "down_proj"]
    names += ["gate_up_proj_bias", "down_proj_bias"] if experts.has_bias else []
    return [getattr(experts, name)[slot] for name in names]


def _per_expert_tensors(live: torch.nn.Module, full: torch.nn.Module, experts: Any) -> int:
    """Every tensor of ``live`` (a router, or the MoE module's own) with one entry per kept
    expert equals ``full``'s at the live map, along the axis whose size the pruning
    changed; returns how many were compared."""
    compared = 0
    full_tensors = dict(full.named_parameters()) | dict(full.named_buffers())
    for name, value in [*live.named_parameters(), *live.named_buffers()]:
        if name.startswith(("experts.", "shared_expert")) or name not in full_tensors:
            continue
        want = full_tensors[name]
        axes = [a for a in range(value.dim()) if value.shape[a] != want.shape[a]]
        if not axes:
            continue
        assert torch.equal(value, want.index_select(axes[0], experts)), name
        compared += 1
    return compared


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
            want = _expert_slice(full_experts, expert, state.neurons[slot])
            for got, value in zip(_live_slot(live_experts, slot), want, strict=True):
                assert torch.equal(got, value), (layer, slot)
        moe_live, moe_full = _experts_module(live), _experts_module(full)
        assert moe_live is not None and moe_full is not None
        assert _per_expert_tensors(moe_live[0], moe_full[0], state.experts) >= 1  # the router
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


@pytest.mark.parametrize("name", FAMILIES)
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
    full = AutoModelForCausalLM.from_pretrained(src)
    moe_layers = sum(_experts_module(block) is not None for block in full.model.layers)
    assert _check_live_weights(runtime, src) == moe_layers
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


def test_an_moe_export_refuses_an_original_that_is_not_its_own(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """The MoE runtime loads its original as a model and checks it against the manifest's
    fingerprint like the dense runtime: the same family with other weights is refused before
    any generation. Catches the MoE path loading ``--original`` without the check (it would
    refresh from the wrong experts)."""
    _, out = exports["mixtral"]
    other = save_tiny_moe("mixtral", tmp_path / "other", seed=1)
    with pytest.raises(OriginalMismatchError):
        GriffinRuntime.from_export(out, str(other))
