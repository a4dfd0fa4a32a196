"""The refresh runtime: exact weights after refresh, static behaviour without it, the ring
buffer's statistic, and refusing a wrong or missing original."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.errors import (
    ModelLoadError,
    OriginalMismatchError,
    UsageError,
    VerificationError,
)
from griffin_export.runtime import GriffinRuntime, _Ring, full_activations
from griffin_export.scoring import griffin_statistic, normalized_square_sum, normalized_squares

from tiny import save_tiny

PROMPT = "The river runs to the sea, and the sea returns as rain."
ARCHS = ["llama", "gpt2", "phi3", "opt", "gpt_neox"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rt")
    made = {}
    for mt in ARCHS:
        src = save_tiny(mt, root / f"{mt}-src")
        export(str(src), [PROMPT], ratio=0.5, out=root / f"{mt}-exp")
        made[mt] = (src, root / f"{mt}-exp")
    return made


@pytest.mark.parametrize("model_type", ARCHS)
def test_weights_after_refresh_equal_the_original_sliced_at_the_event(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    src, out = exports[model_type]
    runtime = GriffinRuntime.from_export(out)
    result = runtime.generate("Rain and rivers", max_new_tokens=30, refresh_every=7, window=9)
    assert len(result.refreshes) >= 1
    assert sum(e.changed for e in result.refreshes) > 0  # experts did move
    event = result.refreshes[-1]
    spec = spec_for(model_type)
    original = AutoModelForCausalLM.from_pretrained(src)
    d_ff = spec.d_ff(original.config)
    for layer, (live, full) in enumerate(
        zip(spec.blocks(runtime.model), spec.blocks(original), strict=True)
    ):
        slots = torch.tensor(event.kept[layer])
        assert torch.equal(slots, runtime.slots[layer])
        for role, module in spec.projections(live).items():
            full_module = spec.projections(full)[role]
            index = torch.cat([slots, slots + d_ff]) if role == "gate_up" else slots
            axis = spec.neuron_axis(role)
            assert torch.equal(module.weight, full_module.weight.index_select(axis, index))
            if getattr(module, "bias", None) is not None:
                want = full_module.bias if role == "down" else full_module.bias[index]
                assert torch.equal(module.bias, want)


def test_refresh_events_record_overlap(exports: dict[str, tuple[Path, Path]]) -> None:
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    result = runtime.generate("Rain and rivers", max_new_tokens=24, refresh_every=6, window=6)
    assert [e.token_index for e in result.refreshes] == [6, 12, 18]
    for event in result.refreshes:
        assert len(event.kept) == len(event.overlap) == 3
        assert all(0.0 <= o <= 1.0 for o in event.overlap)
        assert all(len(set(k)) == len(k) == 18 for k in event.kept)
        moved = any(o < 1.0 for o in event.overlap)
        assert moved == (event.changed > 0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_refresh_off_equals_plain_generate_on_the_export(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    out = exports[model_type][1]
    runtime = GriffinRuntime.from_export(out)
    result = runtime.generate(PROMPT, max_new_tokens=25, refresh_every=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = runtime.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=25, do_sample=False)
    assert result.token_ids == reference[0, ids.shape[1] :].tolist()
    assert result.refreshes == []


def test_ring_buffer_statistic_equals_a_fresh_forward(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """The ring (filled token by token during decoding, wrapping around) gives the statistic
    of one fresh forward of the same live model over the same last W tokens, to 1e-4."""
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    window = 11
    result = runtime.generate(PROMPT, max_new_tokens=20, refresh_every=1000, window=window)
    spec = runtime.spec
    ids = runtime.tokenizer(PROMPT)["input_ids"] + result.token_ids[:-1]  # what went through
    captured: dict[int, torch.Tensor] = {}
    handles = [
        spec.projections(block)["gate"].register_forward_pre_hook(
            lambda _m, a, i=i: captured.__setitem__(i, a[0][0])
        )
        for i, block in enumerate(spec.blocks(runtime.model))
    ]
    with torch.no_grad():
        runtime.model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    for layer, ring in enumerate(runtime._rings):
        act, full = runtime._acts[layer], runtime._full[layer]
        from_ring = normalized_square_sum(full_activations(spec, act, full, ring.contents()))
        fresh = normalized_square_sum(full_activations(spec, act, full, captured[layer][-window:]))
        torch.testing.assert_close(
            griffin_statistic(from_ring, accumulated=True),
            griffin_statistic(fresh, accumulated=True),
            rtol=1e-4,
            atol=1e-5,
        )


def test_ring_keeps_the_last_rows() -> None:
    ring = _Ring(4)
    ring.write(torch.arange(6.0).reshape(6, 1))
    assert sorted(ring.contents().flatten().tolist()) == [2, 3, 4, 5]
    for value in (6.0, 7.0, 8.0):
        ring.write(torch.tensor([[value]]))
    assert sorted(ring.contents().flatten().tolist()) == [5, 6, 7, 8]
    small = _Ring(10)
    small.write(torch.ones(3, 2))
    assert small.contents().shape == (3, 2)


def test_ring_scores_each_row_once_and_sums_the_window() -> None:
    """score_sums after any pattern of writes (wrapping, refreshes in between) equals scoring
    the buffered rows from scratch, and only the rows new since the last call are scored."""
    torch.manual_seed(0)
    ring = _Ring(7)
    weight = torch.randn(5, 9)
    scored: list[int] = []

    def squares(x: torch.Tensor) -> torch.Tensor:
        scored.append(x.shape[0])
        return normalized_squares(torch.nn.functional.silu(x @ weight))

    for chunk in (10, 1, 1, 3, 1, 5, 1):
        ring.write(torch.randn(chunk, 5))
        before = len(scored)
        got = ring.score_sums(squares)
        assert scored[before:] == [min(chunk, 7)]
        expected = normalized_squares(torch.nn.functional.silu(ring.contents() @ weight)).sum(0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ring.score_sums(squares) is not None and len(scored) == 7  # nothing new: no call


def test_ring_scores_on_the_device_that_computes_them() -> None:
    """Rows on one device, scores computed on another (the original's weights stay on the CPU
    while the model runs on an accelerator): the cache follows the scores' device."""
    ring = _Ring(4)
    ring.write(torch.randn(6, 3))
    sums = ring.score_sums(lambda x: torch.empty(x.shape[0], 5, device="meta"))
    assert sums.device.type == "meta" and sums.shape == (5,)
    ring.write(torch.randn(1, 3))
    assert ring.score_sums(lambda x: torch.empty(x.shape[0], 5, device="meta")).shape == (5,)


def test_a_different_original_is_refused(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    other = save_tiny("llama", tmp_path / "other", seed=1)
    with pytest.raises(OriginalMismatchError, match="is not the model"):
        GriffinRuntime.from_export(exports["llama"][1], original=str(other))


def test_a_missing_original_is_a_clear_error(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    src, out = exports["gpt2"]
    moved_out = tmp_path / "exp"
    shutil.copytree(out, moved_out)
    manifest = json.loads((moved_out / "griffin.json").read_text())
    manifest["source"]["directory"] = str(tmp_path / "gone")
    manifest["source"]["model"] = str(tmp_path / "gone")
    (moved_out / "griffin.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"not available here.*--original"):
        GriffinRuntime.from_export(moved_out)
    GriffinRuntime.from_export(moved_out, original=str(src))  # naming it works


def test_bad_generation_options(exports: dict[str, tuple[Path, Path]]) -> None:
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    with pytest.raises(UsageError, match="--window"):
        runtime.generate(PROMPT, window=0)
    with pytest.raises(UsageError, match="--top-p"):
        runtime.generate(PROMPT, temperature=1.0, top_p=0)
    sampled = runtime.generate(PROMPT, max_new_tokens=10, temperature=0.8, top_k=20, seed=3)
    again = GriffinRuntime.from_export(exports["llama"][1]).generate(
        PROMPT, max_new_tokens=10, temperature=0.8, top_k=20, seed=3
    )
    assert sampled.token_ids == again.token_ids


def test_cli_generate_json(exports: dict[str, tuple[Path, Path]]) -> None:
    out = exports["llama"][1]
    args = ["generate", "--model", str(out), "--prompt-text", PROMPT, "-n", "12", "--refresh", "4"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["token_ids"]) == 12 and len(data["refreshes"]) == 2
    assert data["tokens_per_second"] > 0
    streamed = CliRunner().invoke(app, args)
    assert streamed.exit_code == 0, streamed.output
    assert "refreshes" in streamed.output


def test_a_tampered_export_is_refused(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    tampered = tmp_path / "exp"
    shutil.copytree(exports["llama"][1], tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="failed verification"):
        GriffinRuntime.from_export(tampered)
