"""``griffin ppl``: perplexity protocols (docs/design.md, "Perplexity protocols"), scored with the
next-token NLL and reported. Every figure is produced side by side with the full model on
exactly the same scored tokens.

* ``static``: ordinary LM perplexity over windows of ``seq_len`` tokens.
* ``griffin``: in each window of L tokens the first P go through the full model; every layer
  chooses its experts from its own activations of those P positions (or, with refresh, every
  N scored positions from the W positions just before), and positions >= P run with only
  those experts. Only positions >= P are scored. The windows and the hooks are
  :mod:`griffin_export.evaluation.protocols`'s (shared with ``griffin eval``).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import check_budget, layer_sizes
from griffin_export.core.compensation import (
    DEFAULT_ALPHA,
    DEFAULT_METHOD,
    DEFAULT_REFIT_ON_REFRESH,
    Compensation,
    default_alpha,
)
from griffin_export.core.moe import has_down_bias
from griffin_export.core.moe_selection import DEFAULT_EXPERT_SCORE, MoeSizes, plan_moe_sizes
from griffin_export.core.scoring import (
    STATISTIC_NAME,
    check_ratio,
    top_k_indices,
)
from griffin_export.core.selection import non_finite_message
from griffin_export.errors import UsageError
from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.evaluation.protocols import (
    Setting,
    Window,
    ff_setting,
    make_windows,
    window_starts,
)
from griffin_export.formats.exports import is_export, load_original, open_export_with_original
from griffin_export.formats.verify import check_export_files
from griffin_export.storage.loading import load_model, parse_dtype, require_tokenizer
from griffin_export.storage.sources import resolve_source

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
                with ff_setting(spec, model, setting, prompt_len, ids.to(device)):
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


def moe_griffin_settings(
    spec: ArchSpec,
    model: nn.Module,
    ratios: Sequence[float],
    experts: float,
    compensate: str = "none",
    alpha: float | None = None,
    expert_score: str = DEFAULT_EXPERT_SCORE,
) -> list[Setting]:
    """The report rows of a ``griffin`` run on a mixture of experts: full, then per ratio
    the experts and neurons each window's prompt part chooses, ``experts`` of the routed
    experts kept per layer and ``ratio`` of every FF's neurons
    (:func:`~griffin_export.core.moe_selection.plan_moe_sizes`, as ``griffin export``)."""
    settings = [Setting("full", "full")]
    for ratio in ratios:
        check_ratio(ratio)
        settings.append(
            Setting(
                f"griffin r={ratio:g} experts={experts:g}",
                "griffin",
                compensate=compensate,
                alpha=default_alpha(ratio) if alpha is None else alpha,
                moe=plan_moe_sizes(spec, model, ratio, experts),
                expert_score=expert_score,
            )
        )
    return settings


def check_moe_griffin(
    refreshes: Sequence[int],
    window: int | None,
    baselines: Sequence[str],
    budgets: Sequence[str] | None,
) -> None:
    """Refuse the ``griffin`` options a mixture of experts does not take: each window
    chooses once, from its whole prompt part, one width per kind of FF."""
    if any(refreshes):
        raise UsageError(
            f"--refresh {','.join(map(str, refreshes))} re-chooses neurons of dense FF layers; "
            "on a mixture of experts each window chooses once, from its prompt part: drop "
            "--refresh"
        )
    if window is not None:
        raise UsageError(
            f"--window {window} applies to dense models; on a mixture of experts the whole "
            "prompt part chooses (use --prompt-len to change it): drop --window"
        )
    if baselines:
        raise UsageError(
            f"--baselines {','.join(baselines)} rank the neurons of dense FF layers; a mixture "
            "of experts has no such baseline here: drop --baselines"
        )
    if budgets is not None and list(budgets) != ["uniform"]:
        raise UsageError(
            f"--budget {','.join(budgets)} is for dense models; a mixture of experts keeps one "
            "width per kind of FF (one config field each): drop --budget"
        )


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
    within_documents: bool = False,
    experts: float | None = None,
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

    By default the corpus is one stream (its documents joined with a blank line) and a window
    may hold the end of one document and the start of the next. ``within_documents``: every
    document is tokenized on its own and cut on its own, so no window crosses a document
    boundary (``griffin`` then chooses experts and scores on the same document); a document
    shorter than a window is skipped, and the report's params say how many were
    (``documents_skipped``), beside ``within_documents`` itself.

    On a mixture of experts, ``griffin`` chooses each window's experts and their neurons
    from its prompt part as ``griffin export`` does (``experts``: the fraction of routed
    experts kept per layer, default 1.0, beside ``ratios``; refits per kept expert on its
    routed prompt tokens), and the rest of the window runs the sliced layers
    (:mod:`griffin_export.evaluation.moe_protocol`); ``refreshes``, ``window``,
    ``baselines`` and budgets other than uniform are refused there. On an MoE export,
    ``griffin`` replays the manifest's kept sizes.
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
    if experts is not None:
        check_ratio(experts, "--experts")
    if experts not in (None, 1.0) and (exported or protocol != "griffin"):
        raise UsageError(
            f"--experts {experts:g} applies to --protocol griffin on a full model; an export's "
            "experts were fixed by griffin export: drop --experts"
        )
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
        if recipe.get("moe") is not None:
            check_moe_griffin(refreshes, window, baselines, budgets)
    elif exported:
        export, full = open_export_with_original(model, original, device)
        tokenizer = export.loaded.tokenizer or full.tokenizer
    else:
        full = load_model(resolve_source(model, progress), parse_dtype(dtype), device)
        tokenizer = full.tokenizer
    report("load", 1, 1)
    tokenizer = require_tokenizer(tokenizer, model)
    moe = full.spec.moe is not None and protocol == "griffin" and recipe is None
    if experts not in (None, 1.0) and not moe:
        raise UsageError(
            f"--experts {experts:g} keeps routed experts of a mixture of experts; "
            f"'{full.model_type}' is a dense model: drop --experts"
        )
    if moe:
        check_moe_griffin(refreshes, window, baselines, budgets)
        how.check_model(has_down_bias(full.spec, full.model), full.model_type)

    bos = bos_token(tokenizer)
    span = seq_len - (bos is not None)  # corpus tokens per window
    needed = (
        max_tokens
        if max_tokens is not None
        else (None if max_windows is None else span + (max_windows - 1) * (stride or span))
    )
    lengths: list[int] | None = None
    if within_documents:
        tokens, lengths = document_tokens(
            tokenizer, corpus.documents, span, stride or span, max_windows, max_tokens
        )
    else:
        tokens = corpus_tokens(tokenizer, corpus.text, needed)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    score_from = prompt_len if protocol == "griffin" else 1
    windows = make_windows(tokens, seq_len, stride, max_windows, score_from, bos, lengths)

    ratios = ratios or (0.5,)
    budgets = budgets or ("uniform",)
    runs: list[tuple[nn.Module, ArchSpec, Setting]]
    if protocol == "static":
        runs = [(full.model, full.spec, Setting("full", "full"))]
        if exported:
            name = Path(model).name or str(model)
            runs.append((export.loaded.model, export.spec, Setting(name, "full")))
    elif recipe is not None and recipe.get("moe") is not None:
        made = recipe.get("compensation") or {"method": "none", "alpha": DEFAULT_ALPHA}
        record: Any = recipe["moe"]
        settings = [
            Setting("full", "full"),
            Setting(
                f"griffin {Path(model).name or model}",
                "griffin",
                compensate=str(made["method"]),  # type: ignore[index]
                alpha=float(made["alpha"]),  # type: ignore[index]
                moe=MoeSizes(**record["sizes"]),
                expert_score=str(record.get("expert_score", DEFAULT_EXPERT_SCORE)),
            ),
        ]
        runs = [(full.model, full.spec, s) for s in settings]
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
    elif moe:
        settings = moe_griffin_settings(
            full.spec, full.model, ratios, experts or 1.0, how.method, alpha
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
            "experts": (experts or 1.0) if moe else None,
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
            "within_documents": within_documents,
            "documents_used": None if lengths is None else len({w.document for w in windows}),
            "documents_skipped": None if lengths is None else sum(n < span for n in lengths),
        },
        on_window=lambda done: report("score", done, len(windows)),
    )


def document_tokens(
    tokenizer: object,
    documents: Sequence[str],
    span: int,
    stride: int,
    max_windows: int | None = None,
    max_tokens: int | None = None,
) -> tuple[Tensor, list[int]]:
    """The token ids of ``documents``, each tokenized on its own, concatenated, and each one's
    token count: what :func:`~griffin_export.evaluation.protocols.make_windows` needs to cut
    windows within documents. It stops after the document that brings ``max_windows``
    windows (of ``span`` tokens, ``stride`` apart, within a document) or ``max_tokens``
    tokens, and tokenizes only the prefix of a long document that those need."""
    parts: list[Tensor] = []
    lengths: list[int] = []
    windows = total = 0
    for document in documents:
        needed = None if max_windows is None else span + (max_windows - windows - 1) * stride
        if max_tokens is not None:
            needed = min(max_tokens - total, needed if needed is not None else max_tokens)
        ids = corpus_tokens(tokenizer, document, needed)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        parts.append(ids)
        lengths.append(ids.numel())
        total += ids.numel()
        windows += len(window_starts(ids.numel(), span, stride))
        if (max_windows is not None and windows >= max_windows) or (
            max_tokens is not None and total >= max_tokens
        ):
            break
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)), lengths


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
        "moe": manifest.get("moe"),
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
