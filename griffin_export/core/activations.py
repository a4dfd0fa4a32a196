"""Capture the inputs of every layer's down projection while prompts run through the model.

One hook for every job that looks at them: selection observes (pooling them and choosing
neurons is :class:`~griffin_export.core.selection.LayerSelector`'s job, fed layer-major by
:func:`run_layer_major`); the evaluation protocols also replace them (a masked or refitted
input is exactly a pruned layer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec


@contextmanager
def capture_down_inputs(
    spec: ArchSpec, model: nn.Module, sink: Callable[[int, Tensor], Tensor | None]
) -> Iterator[None]:
    """Call ``sink(layer_index, z)`` with each down projection's input during forwards.

    ``z`` is ``[batch, seq, d_ff]`` as the module receives it; hooks are removed on exit. A
    sink that returns a tensor replaces ``z`` with it (same shape): the down projection runs
    on that instead.
    """
    handles = []
    for index, block in enumerate(spec.blocks(model)):

        def hook(
            _module: nn.Module, args: tuple[Tensor, ...], index: int = index
        ) -> tuple[Tensor, ...] | None:
            replaced = sink(index, args[0])
            return None if replaced is None else (replaced, *args[1:])

        handles.append(spec.down_module(block).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


#: hooks that feed a sink during forwards: ``capture(spec, model, sink)`` (a context manager)
Capture = Callable[[ArchSpec, nn.Module, Callable[[int, Any], None]], AbstractContextManager[None]]


class _StopForward(Exception):
    """Raised by the last layer's hook to end a forward early."""


def run_layer_major(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    sink: Callable[[int, Any], None],
    device: torch.device,
    on_prompt: Callable[[int], None] | None = None,
    capture: Capture | None = None,
) -> int:
    """Run each prompt (``[seq]`` or ``[1, seq]`` token ids, none empty) through ``model``'s
    own forward and call ``sink(layer, z)`` with every layer's down-projection input,
    **layer-major**: all prompts at layer ``l`` (in prompt order) before any prompt at layer
    ``l + 1``. So whatever ``sink`` pools for layer ``l`` is complete, and can be used and
    freed, before layer ``l + 1`` starts: memory held per layer never adds up over depth.

    Each prompt is its own forward (no padding, no attention across prompts). Several prompts
    run as forwards on threads that take turns at every decoder block, exactly one computing
    at a time (:class:`_Turns`); one prompt runs on the calling thread. So every prompt's
    forward is alive at once: one thread per prompt, each holding its residual stream
    (``[seq, hidden]`` and that block's intermediates while it computes): memory grows with
    the number (and length) of prompts, not with depth. On a failure, or Ctrl-C, every
    started forward is ended and waited for before this raises. Every forward stops at
    the last layer's down-projection input (nothing after it matters for selection: not the
    last FF output, not the vocabulary-sized logits). ``on_prompt(i)`` is called when prompt
    ``i`` is done. Returns the number of tokens.

    ``capture`` replaces :func:`capture_down_inputs` as the hooks that feed ``sink`` (the
    mixture-of-experts selection captures routed tokens, :mod:`griffin_export.core.
    moe_selection`); the forward then stops after the last decoder block instead.
    """
    blocks = spec.blocks(model)
    n_layers = len(blocks)

    def capture_down(layer: int, z: Tensor) -> None:
        sink(layer, z)
        if layer == n_layers - 1:
            raise _StopForward

    def stop(_m: nn.Module, _a: object, _o: object) -> None:
        raise _StopForward

    def forward(index: int, ids: Tensor) -> None:
        with torch.inference_mode(), suppress(_StopForward):
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
        if on_prompt is not None:
            on_prompt(index)

    hooks: AbstractContextManager[None]
    if capture is None:
        hooks = capture_down_inputs(spec, model, capture_down)
        handle = None
    else:
        hooks = capture(spec, model, sink)
        handle = blocks[n_layers - 1].register_forward_hook(stop)
    try:
        with hooks:
            if len(prompts) == 1:
                forward(0, prompts[0])
            else:
                _take_turns(spec, model, prompts, forward)
    finally:
        if handle is not None:
            handle.remove()
    return sum(int(ids.numel()) for ids in prompts)


class _Abandoned(Exception):
    """Raised in a forward whose turn will not come: another one failed."""


class _Turns:
    """Turns among ``n`` forwards: exactly one runs; :meth:`pass_on` hands the turn to the
    next unfinished one (round robin) and waits for it to come back. The first failure ends
    every other forward at its next turn."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.finished = [False] * n
        self.failure: BaseException | None = None

    def _advance(self, index: int) -> None:
        n = len(self.finished)
        for step in range(1, n + 1):
            if not self.finished[(index + step) % n]:
                self.turn = (index + step) % n
                break
        self.cond.notify_all()

    def wait(self, index: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == index or self.failure is not None)
            if self.failure is not None:
                raise _Abandoned

    def pass_on(self, index: int) -> None:
        with self.cond:
            self._advance(index)
        self.wait(index)

    def finish(self, index: int, failure: BaseException | None = None) -> None:
        with self.cond:
            self.finished[index] = True
            if failure is not None and self.failure is None:
                self.failure = failure
            self._advance(index)


def _take_turns(
    spec: ArchSpec,
    model: nn.Module,
    prompts: Sequence[Tensor],
    forward: Callable[[int, Tensor], None],
) -> None:
    """``forward(i, prompts[i])`` for every prompt, each on its own thread, the threads taking
    turns before every decoder block: prompt 0 runs up to block 0, then prompt 1 does, ...,
    then prompt 0 runs block 0, prompt 1 runs block 0, ... Raises the first failure."""
    turns = _Turns(len(prompts))
    local = threading.local()

    def before_block(_module: nn.Module, _args: object) -> None:
        turns.pass_on(local.index)

    def work(index: int, ids: Tensor) -> None:
        local.index = index
        try:
            turns.wait(index)
            forward(index, ids)
        except _Abandoned:
            turns.finish(index)
        except BaseException as exc:  # handed to the calling thread, raised there
            turns.finish(index, exc)
        else:
            turns.finish(index)

    # First among a block's pre-hooks: a forward holds its turn for everything the block does
    # (the streaming export loads the block's tensors in its own pre-hook).
    handles = [
        block.register_forward_pre_hook(before_block, prepend=True) for block in spec.blocks(model)
    ]
    threads = [
        threading.Thread(target=work, args=(i, ids), name=f"griffin-prompt-{i}", daemon=True)
        for i, ids in enumerate(prompts)
    ]
    started: list[threading.Thread] = []
    try:
        try:
            for thread in threads:
                thread.start()
                started.append(thread)
            for thread in started:
                thread.join()
        except BaseException as exc:  # a start failed, or Ctrl-C while waiting
            _abandon(turns, started, exc)
            raise
    finally:
        for handle in handles:
            handle.remove()
    if turns.failure is not None:
        raise turns.failure


def _abandon(turns: _Turns, threads: Sequence[threading.Thread], failure: BaseException) -> None:
    """End every started forward at its next turn (``failure`` is the reason) and wait for
    all of them, so none runs or calls the sink once the caller has raised. A further
    Ctrl-C while waiting does not stop the wait: the forwards end at their next turn anyway."""
    with turns.cond:
        turns.failure = turns.failure or failure
        turns.cond.notify_all()
    pending = list(threads)
    while pending:
        try:
            pending[0].join()
        except BaseException:  # a second Ctrl-C: keep waiting
            continue
        pending.pop(0)
