"""GRIFFIN's refresh schedule: when the experts are re-chosen along a sequence, and from which
positions. One schedule for the refresh runtime (:mod:`griffin_export.runtime.refresh`),
``griffin eval --mode gen`` and ``griffin ppl``'s ``griffin`` protocol.

Positions are counted in *steps* from an origin: step ``j`` is position ``origin + j``. With
refresh period ``every`` = N, the experts that run at step ``j`` are re-chosen just before it
whenever ``j`` is a positive multiple of N, from the ``window`` = W positions just before it
(all earlier ones if W is None). Pure logic: no tensors.

Where the origin lies is each protocol's own:

* generation (the runtime, ``eval --mode gen``): the prompt's last position, so step ``j`` is
  the forward of generated token ``j`` (the first one comes from the prefill), and a refresh
  falls after every N generated tokens;
* ``ppl --protocol griffin``: the first scored position P, so the segments are P..P+N-1,
  P+N..P+2N-1, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Segment(NamedTuple):
    """Positions ``seg_from:seg_to`` run with the experts chosen from ``look_from:look_to``."""

    look_from: int
    look_to: int
    seg_from: int
    seg_to: int


@dataclass(frozen=True)
class RefreshSchedule:
    """Re-choose the experts every ``every`` steps (0: never) from the last ``window``
    positions (None: all earlier positions)."""

    every: int = 0
    window: int | None = None

    def due(self, step: int) -> bool:
        """Whether the experts are re-chosen just before step ``step`` (``step`` >= 1)."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def look_back(self, position: int) -> tuple[int, int]:
        """``(start, position)``: the positions that choose the experts run from
        ``position`` on, the last ``window`` before it."""
        start = 0 if self.window is None else max(0, position - self.window)
        return start, position

    def segments(self, first: int, end: int) -> list[Segment]:
        """Positions ``first:end`` cut where refreshes fall, with origin ``first`` (a segment
        starts at ``first`` and at every step that is :meth:`due`), each with the positions
        that choose its experts (:meth:`look_back` of its start)."""
        starts = [p for p in range(first, end) if p == first or self.due(p - first)]
        if not starts:
            return []
        return [
            Segment(*self.look_back(start), start, stop)
            for start, stop in zip(starts, [*starts[1:], end], strict=True)
        ]
