"""``griffin eval``: lm-eval task accuracy beside the full model, with a Rich table or JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import typer
from rich.table import Table

from griffin_cli.main import (
    Compensate,
    Dtype,
    alpha_option,
    app,
    budgets_option,
    err_console,
    out_console,
    stage_progress,
)
from griffin_export.core.compensation import DEFAULT_METHOD
from griffin_export.errors import OutputError, UsageError
from griffin_export.evaluation.taskeval import TaskEvalReport, evaluate_tasks
from griffin_export.storage.sources import DEFAULT_MODEL

#: ``--mode`` choices (the library's :data:`~griffin_export.evaluation.taskeval.MODES`).
EvalMode = Literal["static", "class", "gen"]


@app.command("eval")
def eval_command(
    model: list[str] | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Export directories of one original (static mode; repeatable), or one full model "
        "(class and gen modes, as for export).",
        show_default=DEFAULT_MODEL,
    ),
    models: list[str] | None = typer.Argument(None, hidden=True),  # the same, positional
    tasks: list[str] = typer.Option(
        ...,
        "--tasks",
        help="lm-eval task names, comma-separated or repeated; offline: griffin_wiki_next, "
        "griffin_shakespeare_next (ours, not standard benchmarks).",
    ),
    mode: EvalMode | None = typer.Option(
        None,
        "--mode",
        help="static: exports as they are, beside their original; class: GRIFFIN's "
        "classification mode (experts from each request's context); gen: experts from the "
        "prompt, pruned decoding.",
        show_default="static for exports, class for a full model",
    ),
    ratio: list[float] | None = typer.Option(
        None,
        "--ratio",
        "-r",
        help="class/gen: fraction of FF neurons kept; repeatable.",
        show_default="0.5",
    ),
    experts: float | None = typer.Option(
        None,
        "--experts",
        "-e",
        help="class/gen on a mixture of experts: fraction of the routed experts kept per "
        "layer, in (0, 1], beside --ratio (of every expert's neurons).",
        show_default="1.0",
    ),
    budget: list[str] | None = budgets_option("class/gen"),
    refresh: int = typer.Option(
        0, "--refresh", help="gen: re-choose the experts every N generated tokens (0 = never)."
    ),
    window: int | None = typer.Option(
        None,
        "--window",
        "-W",
        help="gen: re-choose from the last W positions.",
        show_default="all",
    ),
    original: str | None = typer.Option(
        None,
        "--original",
        help="static: the exports' full model.",
        show_default="the manifest's source",
    ),
    include_path: list[Path] | None = typer.Option(
        None, "--include-path", help="A folder of your own lm-eval task YAML; repeatable."
    ),
    limit: int | None = typer.Option(None, "--limit", help="At most N documents per task."),
    num_fewshot: int | None = typer.Option(
        None,
        "--num-fewshot",
        help="Few-shot examples per prompt.",
        show_default="the task's own, else 0",
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", "-b", help="Requests per forward (static only; class/gen need 1)."
    ),
    max_gen_tokens: int | None = typer.Option(
        None,
        "--max-gen-tokens",
        help="gen: at most N new tokens.",
        show_default="the task's own, else 256",
    ),
    dtype: Dtype = typer.Option(
        "auto",
        "--dtype",
        case_sensitive=False,
        help="Full model dtype; auto keeps the source's (exports keep theirs).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    compensate: Compensate | None = typer.Option(
        None,
        "--compensate",
        help="class: refit the kept neurons' down-projection columns on the positions that "
        "chose them (refit, refit-bias), as griffin export and ppl do; none is GRIFFIN's own "
        "mode. gen and static take none only.",
        show_default=f"{DEFAULT_METHOD} for class",
    ),
    alpha: float | None = alpha_option("class"),
    check: bool = typer.Option(
        False,
        "--check",
        help="class/gen: also run ratio 1.0 and fail unless it equals the full model exactly.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON here."),
    log_samples: Path | None = typer.Option(
        None,
        "--log-samples",
        help="Write every request's log-likelihood (or text) per setting, side by side (JSONL).",
    ),
) -> None:
    """Task accuracy (lm-evaluation-harness) of pruned settings beside the full model."""
    _quiet()
    labels = {"load": "Loading models", "eval": "Evaluating settings"}
    with stage_progress(labels, transient=as_json) as on_progress:
        report = evaluate_tasks(
            _models(model, models),
            tasks=tasks,
            mode=mode,
            original=original,
            ratios=ratio,
            budgets=budget or None,
            refresh=refresh,
            window=window,
            include_path=include_path or [],
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_gen_tokens=max_gen_tokens,
            dtype=dtype,
            device=device,
            check=check,
            compensate=compensate,
            alpha=alpha,
            progress=on_progress,
            experts=experts,
        )
    data = report.to_dict()
    if output is not None:
        _write(output, json.dumps(data, indent=2, default=str) + "\n")
    if log_samples is not None:
        rows = report.sample_rows()
        _write(log_samples, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    for table in eval_tables(report):
        out_console.print(table)
    if report.check is not None:
        err_console.print(
            f"check: ratio 1.0 equals the full model on all {report.check['requests']} requests"
        )


def _models(option: list[str] | None, positional: list[str] | None) -> list[str]:
    """``--model`` (repeatable) or the positional form; not both."""
    if option and positional:
        raise UsageError(
            f"pass the models once: griffin eval --model M ..., not also '{positional[0]}'"
        )
    return option or positional or [DEFAULT_MODEL]


def _quiet() -> None:
    """Progress is ours (Rich): keep lm-eval's log lines and datasets' bars off the terminal."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def eval_tables(report: TaskEvalReport) -> list[Table]:
    """One table per task: a row per setting (full first), per metric its value with the
    standard error and its change vs full."""
    rows = report.metric_rows()
    tables = []
    for task in report.tasks:
        metrics = [r for r in rows if r.task == task]
        n = report.results["full"].get("n-samples", {}).get(task, {}).get("effective")
        table = Table(
            title=f"{task}: {report.mode}" + (f", {n} documents" if n else ""),
            title_justify="left",
        )
        table.add_column("setting")
        for row in metrics:
            table.add_column(row.metric, justify="right")
            table.add_column("vs full", justify="right")
        for setting in report.settings:
            cells = [setting.name]
            for row in metrics:
                value, full = row.values.get(setting.name), row.values.get("full")
                change = (
                    ""
                    if setting.name == "full" or not (value and full)
                    else (f"{value[0] - full[0]:+.3f}")
                )
                cells += [_cell(value), change]
            table.add_row(*cells)
        table.caption = f"{sum(report.seconds.values()):.0f} s for {len(report.settings)} settings"
        tables.append(table)
    return tables


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return ""
    mean, err = value
    return f"{mean:.3f}" + ("" if err is None else f" ± {err:.3f}")


def _write(path: Path, text: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write '{path}' ({exc.strerror}); choose another path") from exc
