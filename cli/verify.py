"""``griffin verify``: check an export directory, one line per problem."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from griffin_cli.main import app, err_console, model_option, out_console, pick_model
from griffin_export.verify import verify_export


@app.command("verify")
def verify_command(
    model: str | None = model_option("The export directory: what griffin export wrote."),
    export_dir: Path | None = typer.Argument(None, hidden=True),  # old spelling of --model
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
    directory = Path(pick_model(model, export_dir, "verify", "griffin verify --model DIR"))
    report = verify_export(directory, original)
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
            f"[green]ok:[/] {escape(str(directory))} ({escape(', '.join(report.checked))})",
            highlight=False,
            soft_wrap=True,
        )
