"""The FF protocols shared by ``griffin ppl`` (:mod:`griffin_export.evaluation.ppl`) and
``griffin eval`` (:mod:`griffin_export.evaluation.eval_modes`): windows of a token stream, and
the hooks that make a model's FF layers run as a :class:`Setting` prescribes.

The ``griffin`` protocol: in each window of L tokens the first P go through the full model;
every layer chooses its experts from its own activations of those P positions (or, with
refresh, every N scored positions from the W positions just before:
:class:`~griffin_export.core.schedule.RefreshSchedule`), and positions >= P run with only those
experts.

It runs as **one forward per window**: a pre-hook on every down projection
(:func:`~griffin_export.core.activations.capture_down_inputs`) sees the full-width input ``z``
``[B, L, d_ff]``, selects experts from the positions a segment may look at, and zeroes the
other neurons at the segment's positions. Zeroing a down projection's input neuron is exactly
slicing it away (down's bias is kept), and a layer's experts depend only on that layer's
activations at earlier positions, which the masked forward computes exactly as a
token-by-token run would. Selection uses the same statistic and top-k as ``griffin export``
(:mod:`griffin_export.core.scoring`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.compensation import (
    DEFAULT_ALPHA,
    DEFAULT_REFIT_ON_REFRESH,
    Compensation,
    GramStats,
    Regression,
)
from griffin_export.core.moe_selection import DEFAULT_EXPERT_SCORE, MoeSizes
from griffin_export.core.schedule import RefreshSchedule, Segment
from griffin_export.core.scoring import normalized_square_sum
from griffin_export.core.selection import choose_experts
from griffin_export.errors import UsageError
from griffin_export.evaluation.moe_protocol import PrunedPositions, choose_from_prompt

# -- windows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """``ids`` ``[L]``; targets at positions ``>= score_from`` are scored. ``document``: the
    index of the document the window was cut from (0 for a single stream)."""

    ids: Tensor
    score_from: int
    document: int = 0


def window_starts(length: int, span: int, stride: int) -> range:
    """Where the windows of ``span`` tokens, ``stride`` apart, start in a stream (or document)
    of ``length`` tokens: every start whose window fits; none if ``length < span``."""
    return range(0, length - span + 1, stride)


def make_windows(
    tokens: Tensor,
    seq_len: int,
    stride: int | None = None,
    max_windows: int | None = None,
    min_score_from: int = 1,
    bos: int | None = None,
    documents: Sequence[int] | None = None,
) -> list[Window]:
    """Cut a 1-D token stream into windows of ``seq_len``.

    Without ``stride`` windows do not overlap and every position >= ``min_score_from`` is
    scored. With ``stride`` s < L, window i starts at i*s and scores only its last s positions
    (all of them in the first window), so each token is scored once with L-s tokens of context.

    With ``bos`` (a model whose tokenizer starts every text with it), every window is that
    token followed by L-1 tokens of the stream, cut as above with L-1 in place of L: the BOS
    is context only, never a scored target, and each stream token is still scored once.

    With ``documents`` (the token counts of the consecutive documents ``tokens`` holds, in
    order), no window crosses a document boundary: each document is cut as above on its own
    (its first window scores all positions >= ``min_score_from``), the tail of a document
    shorter than a window is left out, and a document shorter than one window gives none.
    Without, the stream is one document.
    """
    if seq_len < 2 + (bos is not None):
        raise UsageError(f"--seq-len must be at least {2 + (bos is not None)}, got {seq_len}")
    span = seq_len - (bos is not None)  # stream tokens per window
    stride = stride or span
    if not 0 < stride <= span:
        raise UsageError(
            f"--stride must be in 1..{span} (the stream tokens of a window), got {stride}"
        )
    lengths = [tokens.numel()] if documents is None else list(documents)
    if any(n < 0 for n in lengths) or sum(lengths) != tokens.numel():
        raise UsageError(
            f"documents= must be token counts that add up to the stream's {tokens.numel()} "
            f"tokens, got {len(lengths)} counts adding up to {sum(lengths)}"
        )
    head = torch.tensor([] if bos is None else [bos], dtype=tokens.dtype)
    tail_score_from = max(seq_len - stride, min_score_from)
    out: list[Window] = []
    offset = 0
    for document, length in enumerate(lengths):
        for start in window_starts(length, span, stride):
            ids = torch.cat([head, tokens[offset + start : offset + start + span]])
            first = start == 0 or stride == span
            out.append(Window(ids, min_score_from if first else tail_score_from, document))
            if max_windows is not None and len(out) >= max_windows:
                return out
        offset += length
    if not out and documents is None:
        raise UsageError(
            f"the corpus has {tokens.numel()} tokens, fewer than one window of --seq-len "
            f"{seq_len}; use a shorter --seq-len or a larger corpus"
        )
    if not out:
        raise UsageError(
            f"none of the corpus's {len(lengths)} documents holds one window of --seq-len "
            f"{seq_len} (the longest has {max(lengths, default=0)} tokens); use a shorter "
            "--seq-len, or drop --within-documents"
        )
    return out


# -- FF settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How the FF layers run for one row of the report.

    ``kind``: ``full``; ``griffin`` (prompt-adaptive, ``k`` per layer, refresh/window);
    ``static`` (a fixed ``keep`` per layer for every scored position, e.g. a baseline).
    ``moe``: on a mixture of experts, the kept sizes of a ``griffin`` row (experts, their
    width, dense and shared widths); each window's prompt part chooses its experts and
    neurons as ``griffin export`` does (:mod:`griffin_export.evaluation.moe_protocol`),
    ranking experts by ``expert_score``, and ``k``, ``refresh`` and ``window`` are unused.
    """

    name: str
    kind: str
    k: Sequence[int] = ()
    refresh: int = 0
    window: int | None = None
    keep: Sequence[Tensor] = ()
    compensate: str = "none"
    alpha: float = DEFAULT_ALPHA
    #: With ``compensate`` and refresh: refit every segment on its look-back positions (as
    #: the runtime's ``refit_on_refresh``), or only the first (the prompt's, as the export);
    #: later segments then use the plain slice unless their experts equal the previous ones.
    refit_on_refresh: bool = DEFAULT_REFIT_ON_REFRESH
    moe: MoeSizes | None = None
    expert_score: str = DEFAULT_EXPERT_SCORE


def griffin_segments(
    prompt_len: int, seq_len: int, refresh: int, window: int | None
) -> list[Segment]:
    """``(look_from, look_to, seg_from, seg_to)`` per segment of scored positions: the refresh
    schedule (:class:`~griffin_export.core.schedule.RefreshSchedule`) with its origin at the
    first scored position.

    Experts for positions ``seg_from:seg_to`` are chosen from positions ``look_from:look_to``:
    the prompt (last ``window`` of it) first, then with ``refresh`` N every N positions the
    ``window`` positions just before the segment (all earlier ones if ``window`` is None).
    """
    return RefreshSchedule(refresh, window).segments(prompt_len, seq_len)


def griffin_mask(
    z: Tensor, k: int, segments: Sequence[tuple[int, int, int, int]], layer: int = 0
) -> Tensor:
    """Multiplicative mask ``[B, L, d_ff]`` keeping, in each segment, the top-``k`` neurons of
    the GRIFFIN statistic over that segment's look-back positions (1 everywhere else).
    ``layer`` is named in the error if the statistic is not finite."""
    batch, _, d_ff = z.shape
    mask = torch.ones_like(z)
    for b in range(batch):
        for look_from, look_to, seg_from, seg_to in segments:
            keep = torch.zeros(d_ff, dtype=z.dtype, device=z.device)
            keep[_segment_experts(z[b, look_from:look_to], k, layer)] = 1
            mask[b, seg_from:seg_to] = keep
    return mask


def _segment_experts(look: Tensor, k: int, layer: int) -> Tensor:
    _, keep = choose_experts(normalized_square_sum(look), k, layer, look.dtype)
    return keep.to(look.device)


def griffin_refit_input(
    z: Tensor,
    k: int,
    segments: Sequence[tuple[int, int, int, int]],
    method: str,
    alpha: float,
    refit_on_refresh: bool = DEFAULT_REFIT_ON_REFRESH,
    layer: int = 0,
) -> Tensor:
    """``z`` with, in each segment, the dropped neurons replaced by their ridge prediction
    from the kept ones, fitted on the segment's look-back positions
    (:func:`griffin_export.core.compensation.regression`). The down projection of this input
    equals the refitted kept columns (and bias) applied to the kept neurons
    (``W_S z_S + W_D (coef^T z_S + offset) = W' z_S + b``): exactly what an export refitted
    on those positions computes.

    Without ``refit_on_refresh`` only the first segment (the prompt's) is refitted, as the
    runtime with its refit off does: a later segment keeps the regression it had while its
    experts stay the same set, and once they change its dropped neurons are zeroed (the
    plain slice), until the end of the window."""
    out = z.clone()
    for b in range(z.shape[0]):
        reg: Regression | None = None
        for i, (look_from, look_to, seg_from, seg_to) in enumerate(segments):
            look = z[b, look_from:look_to]
            keep = _segment_experts(look, k, layer)
            if i == 0 or refit_on_refresh:
                stats = GramStats.zeros(z.shape[-1], z.device)
                stats.add(look)
                reg = stats.regression(keep, alpha, method == "refit-bias")
            elif reg is not None and not torch.equal(reg.keep, keep):
                reg = None  # the experts changed: the plain slice from here on
            seg = z[b, seg_from:seg_to]
            if reg is None:
                dropped = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
                dropped[keep] = False
                out[b, seg_from:seg_to, dropped] = 0
            else:
                out[b, seg_from:seg_to, reg.dropped] = reg.predict(seg[:, reg.keep])
    return out


@contextmanager
def ff_setting(
    spec: ArchSpec,
    model: nn.Module,
    setting: Setting,
    prompt_len: int,
    ids: Tensor | None = None,
) -> Iterator[None]:
    """Install the hooks that make ``model``'s FF layers run as ``setting`` prescribes for
    a forward of ``ids`` ``[B, L]`` (needed by a mixture of experts' ``griffin`` row, which
    chooses from each row's first ``prompt_len`` tokens before the forward)."""
    if setting.kind == "full":
        yield
        return
    if setting.moe is not None:
        if ids is None:
            raise UsageError("a mixture of experts' griffin setting needs the window's tokens")
        how = Compensation(setting.compensate, setting.alpha)
        score = setting.expert_score
        choices = [
            choose_from_prompt(spec, model, row[:prompt_len], setting.moe, how, score)
            for row in ids
        ]
        with PrunedPositions(spec, model, choices, prompt_len):
            yield
        return

    def replace(layer: int, z: Tensor) -> Tensor:
        if setting.kind == "griffin":
            segments = griffin_segments(prompt_len, z.shape[1], setting.refresh, setting.window)
            if setting.compensate != "none":
                return griffin_refit_input(
                    z,
                    setting.k[layer],
                    segments,
                    setting.compensate,
                    setting.alpha,
                    setting.refit_on_refresh,
                    layer,
                )
            return z * griffin_mask(z, setting.k[layer], segments, layer)
        mask = torch.ones_like(z)
        keep = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
        keep[setting.keep[layer].to(z.device)] = 1
        mask[:, prompt_len:] = keep
        return z * mask

    with capture_down_inputs(spec, model, replace):
        yield
