"""The refresh schedule (griffin_export/core/schedule.py) against its definition written out as
plain loops: the runtime, ``griffin eval --mode gen`` and ``griffin ppl`` all read it."""

from __future__ import annotations

import pytest

from griffin_export.core.schedule import RefreshSchedule


@pytest.mark.parametrize("every", [0, 1, 2, 5, 40])
@pytest.mark.parametrize("window", [None, 1, 3, 16])
def test_segments_cut_at_every_nth_step_and_look_back_w_positions(
    every: int, window: int | None
) -> None:
    """Segments of positions first..end-1: a new one starts at ``first`` and at every step
    j = p - first that is a positive multiple of N; its experts come from the W positions just
    before its start (clipped at 0; all of them without W). Catches an off-by-one phase, a
    window that includes the start position or one too many, and refresh 0 cutting at all."""
    for first, end in [(0, 1), (3, 4), (5, 23), (20, 48), (9, 9)]:
        schedule = RefreshSchedule(every, window)
        expected = []
        for p in range(first, end):
            if p == first or (every and (p - first) % every == 0):
                lo = 0 if window is None else max(0, p - window)
                expected.append([lo, p, p, p + 1])
            else:
                expected[-1][3] = p + 1
        assert [list(s) for s in schedule.segments(first, end)] == expected
        due = [j for j in range(0, end - first) if schedule.due(j)]
        assert due == ([] if not every else list(range(every, end - first, every)))
