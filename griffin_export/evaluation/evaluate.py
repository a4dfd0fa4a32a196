"""Perplexity protocols (DESIGN.md §6). Every figure is produced side by side with the full
model on exactly the same scored tokens.

* ``static``: ordinary LM perplexity over windows of ``seq_len`` tokens.
* ``griffin``: in each window of L tokens the first P go through the full model; every layer
  chooses its experts from its own activations of those P positions (or, with refresh, every
  N scored positions from the W positions just before), and positions >= P run with only
  those experts. Only positions >= P are scored.

The ``griffin`` protocol runs as **one forward per window**: a pre-hook on every down
projection sees the full-width input ``z`` ``[B, L, d_ff]``, selects experts from the
positions a segment may look at, and zeroes the other neurons at the segment's positions.
Zeroing a down projection's input neuron is exactly slicing it away (down's bias is kept), and
a layer's experts depend only on that layer's activations at earlier positions, which the
masked forward computes exactly as a token-by-token run would. Selection uses the same
statistic and top-k as ``griffin export`` (:mod:`griffin_export.core.scoring`).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.activations import capture_down_inputs
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import check_budget, layer_sizes
from griffin_export.core.compensation import (
    DEFAULT_ALPHA,
    DEFAULT_METHOD,
    DEFAULT_REFIT_ON_REFRESH,
    Compensation,
    GramStats,
    Regression,
    default_alpha,
)
from griffin_export.core.schedule import RefreshSchedule, Segment
from griffin_export.core.scoring import (
    STATISTIC_NAME,
    griffin_statistic,
    normalized_square_sum,
    top_k_indices,
)
from griffin_export.core.selection import non_finite_message
from griffin_export.errors import UsageError
from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.formats.exports import is_export, load_original, open_export_with_original
from griffin_export.formats.verify import check_export_files
from griffin_export.storage.checkpoint import load_model, parse_dtype, resolve_source

# -- windows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """``ids`` ``[L]``; targets at positions ``>= score_from`` are scored."""

    ids: Tensor
    score_from: int


def make_windows(
    tokens: Tensor,
    seq_len: int,
    stride: int | None = None,
    max_windows: int | None = None,
    min_score_from: int = 1,
    bos: int | None = None,
) -> list[Window]:
    """Cut a 1-D token stream into windows of ``seq_len``.

    Without ``stride`` windows do not overlap and every position >= ``min_score_from`` is
    scored. With ``stride`` s < L, window i starts at i*s and scores only its last s positions
    (all of them in the first window), so each token is scored once with L-s tokens of context.

    With ``bos`` (a model whose tokenizer starts every text with it), every window is that
    token followed by L-1 tokens of the stream, cut as above with L-1 in place of L: the BOS
    is context only, never a scored target, and each stream token is still scored once.
    """
    if seq_len < 2 + (bos is not None):
        raise UsageError(f"--seq-len must be at least {2 + (bos is not None)}, got {seq_len}")
    span = seq_len - (bos is not None)  # stream tokens per window
    stride = stride or span
    if not 0 < stride <= span:
        raise UsageError(
            f"--stride must be in 1..{span} (the stream tokens of a window), got {stride}"
        )
    head = torch.tensor([] if bos is None else [bos], dtype=tokens.dtype)
    out: list[Window] = []
    start = 0
    while start + span <= tokens.numel():
        first = start == 0 or stride == span
        score_from = min_score_from if first else max(seq_len - stride, min_score_from)
        out.append(Window(torch.cat([head, tokens[start : start + span]]), score_from))
        if max_windows is not None and len(out) >= max_windows:
            break
        start += stride
    if not out:
        raise UsageError(
            f"the corpus has {tokens.numel()} tokens, fewer than one window of --seq-len "
            f"{seq_len}; use a shorter --seq-len or a larger corpus"
        )
    return out


# -- FF settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How the FF layers run for one row of the report.

    ``kind``: ``full``; ``griffin`` (prompt-adaptive, ``k`` per layer, refresh/window);
    ``static`` (a fixed ``keep`` per layer for every scored position, e.g. a baseline).
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


def griffin_mask(z: Tensor, k: int, segments: Sequence[tuple[int, int, int, int]]) -> Tensor:
    """Multiplicative mask ``[B, L, d_ff]`` keeping, in each segment, the top-``k`` neurons of
    the GRIFFIN statistic over that segment's look-back positions (1 everywhere else)."""
    batch, _, d_ff = z.shape
    mask = torch.ones_like(z)
    for b in range(batch):
        for look_from, look_to, seg_from, seg_to in segments:
            keep = torch.zeros(d_ff, dtype=z.dtype, device=z.device)
            keep[_segment_experts(z[b, look_from:look_to], k)] = 1
            mask[b, seg_from:seg_to] = keep
    return mask


def _segment_experts(look: Tensor, k: int) -> Tensor:
    scores = griffin_statistic(normalized_square_sum(look), accumulated=True)
    return top_k_indices(scores, k).to(look.device)


def griffin_refit_input(
    z: Tensor,
    k: int,
    segments: Sequence[tuple[int, int, int, int]],
    method: str,
    alpha: float,
    refit_on_refresh: bool = DEFAULT_REFIT_ON_REFRESH,
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
            keep = _segment_experts(look, k)
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
    spec: ArchSpec, model: nn.Module, setting: Setting, prompt_len: int
) -> Iterator[None]:
    """Install the hooks that make ``model``'s FF layers run as ``setting`` prescribes."""
    if setting.kind == "full":
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
                )
            return z * griffin_mask(z, setting.k[layer], segments)
        mask = torch.ones_like(z)
        keep = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
        keep[setting.keep[layer].to(z.device)] = 1
        mask[:, prompt_len:] = keep
        return z * mask

    with capture_down_inputs(spec, model, replace):
        yield


# -- baselines ---------------------------------------------------------------------------------


def magnitude_keep(spec: ArchSpec, model: nn.Module, k: Sequence[int]) -> list[Tensor]:
    """Static experts by weight norms: neuron j scores the product of the L2 norms of its
    gate row, up row and down column (the rows/columns slicing would keep)."""
    d_ff = spec.d_ff(model.config)
    keep = []
    for layer, block in enumerate(spec.blocks(model)):
        score = torch.ones(d_ff)
        for role, module in spec.projections(block).items():
            weight = module.weight
            assert isinstance(weight, Tensor)
            norms = torch.linalg.vector_norm(
                weight.detach().float().cpu(), dim=1 - spec.neuron_axis(role)
            )
            if role == "gate_up":  # [gate; up] stacked: neuron j owns rows j and d_ff + j
                norms = norms[:d_ff] * norms[d_ff:]
            score = score * norms
        keep.append(top_k_indices(score, k[layer]))
    return keep


def random_keep(d_ff: int, k: Sequence[int], seed: int = 0) -> list[Tensor]:
    """Static random experts, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(d_ff, generator=generator)[:kk]).values for kk in k]


# -- scoring -----------------------------------------------------------------------------------


@torch.inference_mode()
def window_nll(model: nn.Module, ids: Tensor, score_from: int) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over positions ``>= score_from`` of a batch
    ``ids`` ``[B, L]``, and how many tokens that is."""
    keep = ids.shape[1] - score_from + 1  # logits of positions score_from-1 .. L-1
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # [B, <=L, V]
    pred = logits[:, -keep:-1]  # predicts positions score_from..L-1
    target = ids[:, score_from:]
    # In chunks of positions: a float32 copy and log-softmax of all logits at once would
    # cost two more logits-sized buffers (1 GiB each for a 262k vocabulary at L = 1024).
    nll = 0.0
    for first in range(0, target.shape[1], _NLL_CHUNK):
        part = pred[:, first : first + _NLL_CHUNK].float()
        nll += float(
            torch.nn.functional.cross_entropy(
                part.reshape(-1, part.shape[-1]),
                target[:, first : first + _NLL_CHUNK].reshape(-1),
                reduction="sum",
            )
        )
    return nll, target.numel()


_NLL_CHUNK = 128


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class Row:
    name: str
    nll: float = 0.0
    tokens: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass
class PplReport:
    """Perplexities of several settings on the same scored tokens."""

    dataset: str
    protocol: str
    seq_len: int
    prompt_len: int
    windows: int
    tokens_scored: int
    rows: list[Row]
    seconds: float
    params: dict[str, object] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Tokens pushed through the model per second, over all settings."""
        return self.windows * self.seq_len * len(self.rows) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, object]:
        full = next((r.ppl for r in self.rows if r.name == "full"), float("nan"))
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "seq_len": self.seq_len,
            "prompt_len": self.prompt_len,
            "windows": self.windows,
            "tokens_scored": self.tokens_scored,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "seconds": round(self.seconds, 2),
            "params": self.params,
            "results": [
                {"name": r.name, "ppl": r.ppl, "vs_full": r.ppl / full if full == full else None}
                for r in self.rows
            ],
        }


def evaluate(
    runs: Sequence[tuple[nn.Module, ArchSpec, Setting]],
    windows: Sequence[Window],
    *,
    dataset: str,
    protocol: str,
    prompt_len: int = 0,
    batch_size: int = 1,
    params: dict[str, object] | None = None,
    on_window: Callable[[int], None] | None = None,
) -> PplReport:
    """Score every ``(model, spec, setting)`` on the same windows, batch by batch."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    rows = [Row(setting.name) for _, _, setting in runs]
    started = time.perf_counter()
    done = 0
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        score_from = group[0].score_from
        same = [w for w in group if w.score_from == score_from]
        batches = [same] if len(same) == len(group) else [[w] for w in group]
        for batch in batches:
            ids = torch.stack([w.ids for w in batch])
            for row, (model, spec, setting) in zip(rows, runs, strict=True):
                device = next(model.parameters()).device
                with ff_setting(spec, model, setting, prompt_len):
                    nll, count = window_nll(model, ids.to(device), batch[0].score_from)
                if not math.isfinite(nll):
                    dtype = next(model.parameters()).dtype
                    raise UsageError(
                        non_finite_message(f"the log-likelihoods of '{row.name}'", dtype)
                    )
                row.nll += nll
                row.tokens += count
        done += len(group)
        if on_window is not None:
            on_window(done)
    return PplReport(
        dataset=dataset,
        protocol=protocol,
        seq_len=int(windows[0].ids.numel()),
        prompt_len=prompt_len,
        windows=len(windows),
        tokens_scored=rows[0].tokens,
        rows=rows,
        seconds=time.perf_counter() - started,
        params=params or {},
    )


def griffin_settings(
    spec: ArchSpec,
    model: nn.Module,
    ratios: Sequence[float],
    refreshes: Sequence[int],
    window: int | None,
    baselines: Sequence[str],
    seed: int = 0,
    budgets: Sequence[str] = ("uniform",),
    compensate: str = "none",
    alpha: float | None = None,
    refit_on_refresh: bool = DEFAULT_REFIT_ON_REFRESH,
) -> list[Setting]:
    """The report rows of a ``griffin`` run: full, then per ratio GRIFFIN (per budget, per
    refresh) and the requested static baselines at the uniform k per layer. Rows of a budget
    other than uniform are named ``griffin r=<ratio> <budget>``."""
    d_ff = spec.d_ff(model.config)
    n_layers = len(spec.blocks(model))
    for budget in budgets:
        check_budget(budget)
    settings = [Setting("full", "full")]
    for ratio in ratios:
        k = layer_sizes("uniform", n_layers, d_ff, ratio)
        for budget in budgets:
            sizes = layer_sizes(budget, n_layers, d_ff, ratio)
            label = f"griffin r={ratio:g}" + ("" if budget == "uniform" else f" {budget}")
            for refresh in _checked_refreshes(refreshes):
                name = label + (f" refresh={refresh}" if refresh else "")
                settings.append(
                    Setting(
                        name,
                        "griffin",
                        k=sizes,
                        refresh=refresh,
                        window=window,
                        compensate=compensate,
                        alpha=default_alpha(ratio) if alpha is None else alpha,
                        refit_on_refresh=refit_on_refresh,
                    )
                )
        settings += baseline_settings(spec, model, k, f"r={ratio:g}", baselines, seed)
    return settings


def baseline_settings(
    spec: ArchSpec,
    model: nn.Module,
    k: Sequence[int],
    label: str,
    baselines: Sequence[str],
    seed: int = 0,
) -> list[Setting]:
    """Static baseline rows (``magnitude``, ``random``) keeping ``k[l]`` neurons in layer l."""
    settings = []
    for baseline in baselines:
        if baseline == "magnitude":
            keep = magnitude_keep(spec, model, k)
        elif baseline == "random":
            keep = random_keep(spec.d_ff(model.config), k, seed)
        else:
            raise UsageError(f"--baselines '{baseline}' is not known; use magnitude, random")
        settings.append(Setting(f"{baseline} {label}", "static", keep=keep))
    return settings


def perplexity(
    model: str,
    *,
    protocol: str | None = None,
    dataset: str = "wiki-summaries",
    original: str | None = None,
    seq_len: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    prompt_len: int = 512,
    ratios: Sequence[float] | None = None,
    refreshes: Sequence[int] = (0,),
    window: int | None = None,
    baselines: Sequence[str] = (),
    seed: int = 0,
    budgets: Sequence[str] | None = None,
    compensate: str = DEFAULT_METHOD,
    alpha: float | None = None,
    refit_on_refresh: bool = DEFAULT_REFIT_ON_REFRESH,
    batch_size: int = 1,
    dtype: str | None = None,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> PplReport:
    """``griffin ppl``: perplexity of a model or export, always beside the full model.

    ``static`` (default for an export): the export and its original (``original``, default
    the manifest's source, checked against its fingerprint) on the same windows. ``griffin``
    (default for a full model): the full model and, per ratio, GRIFFIN with each per-layer
    budget (:data:`griffin_export.core.budgets.BUDGETS`) and refresh period, plus the requested
    static ``baselines`` at the uniform k. GRIFFIN rows repair the cut as ``griffin export``
    does (``compensate``/``alpha``, same defaults; :mod:`griffin_export.core.compensation`): each
    window (each refresh segment) refits from the positions that chose its experts;
    without ``refit_on_refresh`` only the prompt part refits (the runtime's
    ``refit_on_refresh=False``: a segment whose experts changed runs the plain slice).
    """

    report = progress or (lambda stage, done, total: None)
    exported = is_export(model)
    protocol = protocol or ("static" if exported else "griffin")
    if protocol not in ("static", "griffin"):
        raise UsageError(f"--protocol '{protocol}' is not known; use static or griffin")
    if protocol == "griffin" and not 0 < prompt_len < seq_len:
        raise UsageError(
            f"--prompt-len must be in 1..{seq_len - 1} (below --seq-len), got {prompt_len}"
        )
    if window is not None and window < 1:
        raise UsageError(f"--window must be a positive number of tokens, got {window}")
    for budget in budgets or ():
        check_budget(budget)
    how = Compensation(compensate, DEFAULT_ALPHA if alpha is None else alpha)  # checks both
    if protocol == "static" and budgets is not None and list(budgets) != ["uniform"]:
        raise UsageError(
            f"--budget {', '.join(budgets)} applies to --protocol griffin; an export's budget "
            "was fixed when it was exported (griffin export --budget)"
        )
    corpus = load_corpus(dataset)

    report("load", 0, 1)
    recipe: dict[str, object] | None = None
    if exported and protocol == "griffin":
        full, recipe = _export_recipe(Path(model), original, device, ratios, budgets)
        tokenizer = full.tokenizer
    elif exported:
        export, full = open_export_with_original(model, original, device)
        tokenizer = export.loaded.tokenizer or full.tokenizer
    else:
        full = load_model(resolve_source(model, progress), parse_dtype(dtype), device)
        tokenizer = full.tokenizer
    report("load", 1, 1)
    if tokenizer is None:
        raise UsageError(f"'{model}' has no tokenizer files; add them to the model directory")

    bos = bos_token(tokenizer)
    span = seq_len - (bos is not None)  # corpus tokens per window
    needed = (
        max_tokens
        if max_tokens is not None
        else (None if max_windows is None else span + (max_windows - 1) * (stride or span))
    )
    tokens = corpus_tokens(tokenizer, corpus.text, needed)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    score_from = prompt_len if protocol == "griffin" else 1
    windows = make_windows(tokens, seq_len, stride, max_windows, score_from, bos)

    ratios = ratios or (0.5,)
    budgets = budgets or ("uniform",)
    runs: list[tuple[nn.Module, ArchSpec, Setting]]
    if protocol == "static":
        runs = [(full.model, full.spec, Setting("full", "full"))]
        if exported:
            name = Path(model).name or str(model)
            runs.append((export.loaded.model, export.spec, Setting(name, "full")))
    elif recipe is not None:
        k = list(recipe["k_per_layer"])  # type: ignore[call-overload]
        label = f"griffin {Path(model).name or model}"
        made = recipe.get("compensation") or {"method": "none", "alpha": DEFAULT_ALPHA}
        settings = [Setting("full", "full")] + [
            Setting(
                label + (f" refresh={r}" if r else ""),
                "griffin",
                k=k,
                refresh=r,
                window=window,
                compensate=str(made["method"]),  # type: ignore[index]
                alpha=float(made["alpha"]),  # type: ignore[index]
                refit_on_refresh=refit_on_refresh,
            )
            for r in _checked_refreshes(refreshes)
        ]
        settings += baseline_settings(
            full.spec, full.model, k, f"r={recipe['ratio']:g}", baselines, seed
        )
        runs = [(full.model, full.spec, s) for s in settings]
    else:
        settings = griffin_settings(
            full.spec,
            full.model,
            ratios,
            refreshes,
            window,
            baselines,
            seed,
            budgets,
            how.method,
            alpha,
            refit_on_refresh,
        )
        runs = [(full.model, full.spec, s) for s in settings]
    report("score", 0, len(windows))
    return evaluate(
        runs,
        windows,
        dataset=corpus.name,
        protocol=protocol,
        prompt_len=score_from if protocol == "griffin" else 0,
        batch_size=batch_size,
        params={
            "model": str(model),
            "stride": stride,
            "ratios": list(ratios) if protocol == "griffin" and recipe is None else None,
            "refreshes": list(refreshes) if protocol == "griffin" else None,
            "window": window,
            "baselines": list(baselines),
            "seed": seed,
            "budgets": list(budgets) if protocol == "griffin" else None,
            "recipe": recipe,
            "bos": bos is not None,
            "compensate": how.method if protocol == "griffin" and recipe is None else None,
            "alpha": (
                [default_alpha(r) if alpha is None else alpha for r in ratios or [0.5]]
                if protocol == "griffin" and recipe is None and how.active
                else None
            ),
            "refit_on_refresh": refit_on_refresh if protocol == "griffin" else None,
        },
        on_window=lambda done: report("score", done, len(windows)),
    )


def _checked_refreshes(refreshes: Sequence[int]) -> Sequence[int]:
    for refresh in refreshes:
        if refresh < 0:
            raise UsageError(f"--refresh must be 0 (off) or a positive period, got {refresh}")
    return refreshes


def _export_recipe(
    directory: Path,
    original: str | None,
    device: str,
    ratios: Sequence[float] | None,
    budgets: Sequence[str] | None,
) -> tuple[Any, dict[str, object]]:
    """``--protocol griffin`` on an export: its original, and the export's recipe (k per
    layer, ratio, budget, statistic, compensation) from the checked manifest, which the run
    then uses."""

    manifest = check_export_files(directory)
    recipe: dict[str, object] = {
        "ratio": manifest["ratio"],
        "budget": manifest.get("budget", "uniform"),
        "statistic": manifest.get("statistic"),
        "k_per_layer": list(manifest["k_per_layer"]),
        "compensation": manifest.get("compensation"),
    }
    if ratios is not None or budgets is not None:
        raise UsageError(
            f"--ratio/--budget do not apply to an export with --protocol griffin: it runs the "
            f"export's own recipe (ratio {recipe['ratio']}, budget {recipe['budget']}); drop "
            "them, or pass the original as --model to try others"
        )
    if recipe["statistic"] != STATISTIC_NAME:
        raise UsageError(
            f"'{directory}' was chosen with statistic {recipe['statistic']!r}, which this "
            f"griffin does not compute ({STATISTIC_NAME}); use --protocol static"
        )
    return load_original(directory, manifest, original, device), recipe
