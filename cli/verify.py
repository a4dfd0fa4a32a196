"""``griffin verify``: check an export directory, one line per problem."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from griffin_cli.main import app, err_console, out_console
from griffin_export.verify import verify_export


@app.command("verify")
def verify_command(
    export_dir: Path = typer.Argument(..., help="The directory griffin export wrote."),
    original: str | None = typer.Option(
        None,
        "--original",
        help="The model it was exported from (local directory, .gguf or 'smollm2-135m'): also "
        "check that every pruned tensor is the original sliced at the recorded indices.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Check an export: manifest, file hashes, shapes, kept-index map, and with --original its
    tensors. Exit 0 when all hold, else one line per problem and exit 1."""
    report = verify_export(export_dir, original)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    for problem in report.problems:
        err_console.print(
            f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True
        )
    if not report.ok:
        raise typer.Exit(1)
    if not as_json:
        out_console.print(
            f"[green]ok:[/] {escape(str(export_dir))} ({escape(', '.join(report.checked))})",
            highlight=False,
            soft_wrap=True,
        )
