"""``griffin ppl``: perplexity beside the full model, with a Rich table or JSON."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from griffin_cli.main import (
    BASELINES,
    Compensate,
    Dtype,
    Protocol,
    alpha_option,
    app,
    budgets_option,
    choice_list,
    model_option,
    out_console,
    plural,
    stage_progress,
)
from griffin_export.core.compensation import DEFAULT_METHOD, DEFAULT_REFIT_ON_REFRESH
from griffin_export.evaluation.ppl import PplReport, perplexity
from griffin_export.storage.sources import DEFAULT_MODEL


@app.command("ppl")
def ppl_command(
    model: str = model_option(
        "An export directory, or a full model (as for export).", DEFAULT_MODEL
    ),
    original: str | None = typer.Option(
        None,
        "--original",
        help="The export's full model.",
        show_default="the manifest's source",
    ),
    dataset: str = typer.Option(
        "wiki-summaries",
        "--dataset",
        "-d",
        help="wiki-summaries, shakespeare, britannica, wikitext2 (needs the hub), a text file "
        "(one document) or a directory of *.txt files (one document each).",
    ),
    within_documents: bool = typer.Option(
        False,
        "--within-documents",
        help="No window crosses a document boundary (a summary, a work, an article, a file): "
        "griffin chooses experts and scores on the same document. Documents shorter than a "
        "window are skipped (counted in the report).",
        show_default="windows run across documents joined with a blank line",
    ),
    protocol: Protocol | None = typer.Option(
        None,
        "--protocol",
        help="static: an export beside its original; griffin: prompt-adaptive pruning of a "
        "full model.",
        show_default="static for an export, griffin for a full model",
    ),
    seq_len: int = typer.Option(1024, "--seq-len", "-L", help="Window length in tokens."),
    stride: int | None = typer.Option(
        None, "--stride", help="static: window stride (overlapping windows score their tail)."
    ),
    max_windows: int | None = typer.Option(None, "--max-windows", help="Score at most N windows."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Use at most the first N corpus tokens."
    ),
    prompt_len: int = typer.Option(
        512, "--prompt-len", "-P", help="griffin: tokens per window that choose the experts."
    ),
    ratio: list[float] | None = typer.Option(
        None, "--ratio", "-r", help="griffin: fraction kept; repeatable.", show_default="0.5"
    ),
    experts: float | None = typer.Option(
        None,
        "--experts",
        "-e",
        help="griffin on a mixture of experts: fraction of the routed experts kept per layer, "
        "in (0, 1], beside --ratio (of every expert's neurons).",
        show_default="1.0",
    ),
    refresh: list[int] | None = typer.Option(
        None, "--refresh", help="griffin: re-choose every N scored tokens (0 = never); repeatable."
    ),
    window: int | None = typer.Option(
        None,
        "--window",
        "-W",
        help="griffin: choose from the last W tokens.",
        show_default="all",
    ),
    baselines: list[str] | None = typer.Option(
        None,
        "--baselines",
        callback=choice_list(BASELINES),
        metavar="<magnitude|random>,...",
        help="griffin: static baselines at the same k, magnitude and/or random; repeatable, "
        "or comma-separated.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
    budget: list[str] | None = budgets_option("griffin"),
    compensate: Compensate = typer.Option(
        DEFAULT_METHOD,
        "--compensate",
        help="griffin: repair the pruned layers: refit (the kept neurons' down-projection "
        "columns refitted on each window's prompt part, as griffin export does), refit-bias "
        "(also a down bias), none (the dropped neurons zeroed).",
    ),
    alpha: float | None = alpha_option("griffin"),
    refit_on_refresh: bool = typer.Option(
        DEFAULT_REFIT_ON_REFRESH,
        "--refit-on-refresh/--no-refit-on-refresh",
        help="griffin, with --refresh and a refit: refit at every refresh from the positions "
        "that chose the experts (griffin generate's default), or only on the prompt part "
        "(later segments whose experts changed run the plain slice).",
    ),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Windows per forward."),
    dtype: Dtype = typer.Option(
        "auto",
        "--dtype",
        case_sensitive=False,
        help="Full model dtype; auto keeps the source's (exports keep theirs).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Perplexity of an export or of prompt-adaptive GRIFFIN, beside the full model."""
    labels = {
        "convert": "Converting GGUF (once; cached)",
        "load": "Loading models",
        "score": "Scoring windows",
    }
    with stage_progress(labels, transient=as_json) as on_progress:
        result = perplexity(
            model,
            protocol=protocol,
            dataset=dataset,
            original=original,
            seq_len=seq_len,
            stride=stride,
            max_windows=max_windows,
            max_tokens=max_tokens,
            prompt_len=prompt_len,
            ratios=ratio or None,
            refreshes=refresh or [0],
            window=window,
            baselines=baselines or [],
            seed=seed,
            budgets=budget or None,
            compensate=compensate,
            alpha=alpha,
            refit_on_refresh=refit_on_refresh,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            progress=on_progress,
            within_documents=within_documents,
            experts=experts,
        )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out_console.print(ppl_table(result))


def ppl_table(report: PplReport) -> Table:
    """name, protocol, tokens scored, PPL, change vs full."""
    extra = f", P={report.prompt_len}" if report.protocol == "griffin" else ""
    within = report.params.get("within_documents")
    where = " within documents" if within else ""
    table = Table(
        title=f"{report.dataset}: {plural(report.windows, 'window')} of {report.seq_len}"
        f"{where}{extra}",
        title_justify="left",
    )
    for column in ("name", "protocol", "tokens scored", "PPL", "vs full"):
        table.add_column(column, justify="left" if column in ("name", "protocol") else "right")
    full = next((r.ppl for r in report.rows if r.name == "full"), float("nan"))
    for row in report.rows:
        table.add_row(
            row.name,
            report.protocol,
            f"{row.tokens:,}",
            f"{row.ppl:.2f}",
            f"{row.ppl / full:.2f}x" if row.name != "full" else "",
        )
    table.caption = f"{report.tokens_per_second:,.0f} tokens/s over {report.seconds:.1f} s"
    if within:
        used, skipped = report.params["documents_used"], report.params["documents_skipped"]
        assert isinstance(used, int) and isinstance(skipped, int)
        table.caption += (
            f"; windows from {plural(used, 'document')}, "
            f"{plural(skipped, 'document')} shorter than a window skipped"
        )
    return table
