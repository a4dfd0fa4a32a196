"""Selection runs layer-major: every layer is chosen (and refitted) as soon as all prompts have
passed it, and its prompt activations go at once, so what is held does not grow with depth."""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from griffin_export import export, spec_for
from griffin_export.core import compensation
from griffin_export.core.activations import run_layer_major
from griffin_export.errors import UsageError

from tiny import random_ids, save_tiny, tiny_model

PROMPTS = ["Flocking neurons carry the activation.", "A second prompt, pooled with the first."]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "in-memory"])
def test_refit_statistics_alive_at_once_do_not_grow_with_depth(
    streaming: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompt statistics a refit needs (``GramStats``: the tokens' rows or their Gram
    matrix) alive at any moment of a two-prompt refit export are one layer's, at 2 and at 6
    layers alike, in both paths. Catches statistics kept for every layer until the end (an
    in-memory path that selects all layers, then refits; prompts run one after the other,
    so every layer's statistics wait for the last prompt) and rows that outlive their
    layer's refit."""
    made: list[weakref.ref[compensation.GramStats]] = []
    most: dict[str, int] = {"count": 0, "bytes": 0}
    original_init = compensation.GramStats.__init__
    original_add = compensation.GramStats.add

    def held() -> None:
        alive = [stats for stats in (ref() for ref in made) if stats is not None]
        most["count"] = max(most["count"], len(alive))
        size = sum(
            sum(r.nbytes for r in s.rows) + (0 if s.gram is None else s.gram.nbytes) for s in alive
        )
        most["bytes"] = max(most["bytes"], size)

    def init(self: compensation.GramStats, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        made.append(weakref.ref(self))
        held()

    def add(self: compensation.GramStats, z: torch.Tensor) -> None:
        original_add(self, z)
        held()

    monkeypatch.setattr(compensation.GramStats, "__init__", init)
    monkeypatch.setattr(compensation.GramStats, "add", add)
    seen = {}
    for layers in (2, 6):
        most.update(count=0, bytes=0)
        src = save_tiny("llama", tmp_path / f"src{layers}", num_hidden_layers=layers)
        result = export(
            str(src),
            PROMPTS,
            0.5,
            out=tmp_path / f"out{layers}",
            streaming=streaming,
            compensate="refit",
        )
        assert result.n_layers == layers
        one_layer = result.prompt_tokens * result.d_ff * 4  # float32 rows of every token
        assert most["bytes"] <= one_layer, (layers, most)
        seen[layers] = dict(most)
    assert seen[2]["count"] == seen[6]["count"] == 1, seen


def test_run_layer_major_order_and_values_match_separate_forwards() -> None:
    """Three prompts: the sink sees layer 0 for prompts 0, 1, 2, then layer 1 for 0, 1, 2...,
    each ``z`` equal to that prompt's own forward on its own (an independent capture, one
    plain forward per prompt). Catches prompt-major order, prompts leaking into one another
    (one batch, shared state between the threads) and forwards that run past the last
    layer's down input."""
    model = tiny_model("llama", num_hidden_layers=4)
    spec = spec_for("llama")
    prompts = [random_ids(n, seed=n) for n in (5, 9, 7)]
    want: list[list[torch.Tensor]] = []
    for ids in prompts:
        want.append([])
        hooks = [
            spec.down_module(block).register_forward_pre_hook(
                lambda _m, args: want[-1].append(args[0].clone())
            )
            for block in spec.blocks(model)
        ]
        with torch.no_grad():
            model(input_ids=ids.reshape(1, -1))
        for hook in hooks:
            hook.remove()
    calls: list[tuple[int, torch.Tensor]] = []
    tokens = run_layer_major(
        spec, model, prompts, lambda layer, z: calls.append((layer, z.clone())), torch.device("cpu")
    )
    assert tokens == 21
    assert [layer for layer, _ in calls] == [layer for layer in range(4) for _ in prompts]
    for position, (layer, z) in enumerate(calls):
        torch.testing.assert_close(z, want[position % 3][layer], rtol=0, atol=0)


def test_run_layer_major_raises_a_failure_and_ends_every_forward() -> None:
    """A sink failing in prompt 1 at layer 1 (as a non-finite statistic does) is raised to
    the caller, the other forwards end and no prompt thread is left behind. Catches a
    failure swallowed on its thread and forwards left waiting for a turn forever."""
    model = tiny_model("llama", num_hidden_layers=3)
    spec = spec_for("llama")
    seen: list[int] = []

    def sink(layer: int, _z: torch.Tensor) -> None:
        seen.append(layer)
        if layer == 1 and seen.count(1) == 2:
            raise UsageError("layer 1 is not finite")

    with pytest.raises(UsageError, match="not finite"):
        run_layer_major(
            spec, model, [random_ids(6, s) for s in range(3)], sink, torch.device("cpu")
        )
    assert seen == [0, 0, 0, 1, 1]
    assert not [t for t in threading.enumerate() if t.name.startswith("griffin-prompt")]


def _no_prompt_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("griffin-prompt")]


def test_a_thread_start_failing_ends_the_started_forwards_before_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second prompt's thread fails to start: the error is raised only after the first
    prompt's forward has ended, and the sink is never called after the raise. Catches a start
    loop outside the handler that abandons and joins the started threads (the first forward
    then waits for a turn that never comes, or feeds the sink after the call raised)."""
    model = tiny_model("llama", num_hidden_layers=3)
    spec = spec_for("llama")
    real_start = threading.Thread.start
    starts: list[str] = []

    def start(self: threading.Thread) -> None:
        starts.append(self.name)
        if len(starts) == 2:
            raise RuntimeError("can't start new thread")
        real_start(self)

    calls: list[int] = []
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start"):
        run_layer_major(
            spec,
            model,
            [random_ids(6, s) for s in range(3)],
            lambda layer, _z: calls.append(layer),
            torch.device("cpu"),
        )
    at_raise = len(calls)
    assert _no_prompt_threads()
    for thread in threading.enumerate():  # without the fix: let a stray forward run on
        if thread.name.startswith("griffin-prompt"):
            thread.join(timeout=2)
    assert len(calls) == at_raise


def test_a_second_ctrl_c_while_ending_still_waits_for_every_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while waiting for the forwards, then again while they are being ended: the
    first interrupt is raised once no prompt thread is alive. Catches a second interrupt
    escaping the wait and leaving forwards running after the call raised."""
    model = tiny_model("llama", num_hidden_layers=3)
    spec = spec_for("llama")
    real_join = threading.Thread.join
    joins: list[str] = []

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        joins.append(self.name)
        if len(joins) <= 2:
            raise KeyboardInterrupt
        real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join)
    with pytest.raises(KeyboardInterrupt):
        run_layer_major(
            spec, model, [random_ids(6, s) for s in range(3)], lambda *_: None, torch.device("cpu")
        )
    monkeypatch.undo()
    assert _no_prompt_threads()


@pytest.mark.parametrize("streaming", [False, True])
def test_export_scoring_progress_advances_layer_by_layer(tmp_path: Path, streaming: bool) -> None:
    """The export's "score" progress counts layers, one step as each layer's experts are
    chosen, in both the in-memory and the streaming export; streaming writes each layer right
    after scoring it. Catches counting prompts (layer-major, all prompts finish together at the
    last layer: the bar sits at 0 of N and then jumps)."""
    src = save_tiny("llama", tmp_path / "src")
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    calls: list[tuple[str, int, int]] = []
    prompts = ["The river runs to the sea.", "And the sea returns as rain."]  # != n_layers
    record = lambda *call: calls.append(call)  # noqa: E731
    export(str(src), prompts, 0.5, out=tmp_path / "out", streaming=streaming, progress=record)
    scores = [call for call in calls if call[0] == "score"]
    assert scores == [("score", layer, n_layers) for layer in range(n_layers + 1)]
    if streaming:  # each layer is handed to the writer as soon as it is scored
        for layer in range(1, n_layers + 1):
            at = calls.index(("score", layer, n_layers))
            assert calls[at + 1] == ("write", layer, n_layers)
