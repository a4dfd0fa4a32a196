"""``griffin verify``: check an export directory, one line per problem."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from griffin_cli.main import app, err_console, model_option, out_console, pick_model
from griffin_export.build.prompts import gather_prompts
from griffin_export.build.reproduce import verify_with_prompt
from griffin_export.formats.verify import verify_export


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
    prompt: list[str] | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="The prompt file(s) the export was made from, in order ('-' reads stdin): also "
        "recompute its experts and refitted down projections from them with the original (a "
        "mixture of experts: its kept experts and their neurons).",
    ),
    prompt_text: list[str] | None = typer.Option(
        None, "--prompt-text", "-t", help="Prompt text, as given to griffin export."
    ),
    max_prompt_tokens: int | None = typer.Option(
        None,
        "--max-prompt-tokens",
        help="With --prompt: the truncation the export used (default: the one its manifest "
        "records).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Check an export: manifest, file hashes, shapes, kept-index map (of a mixture of
    experts: kept experts, their neurons, the config's expert count and widths), with
    --original its tensors (every kept expert's slab), and with --prompt the experts and
    refit recomputed from the prompt. Exit 0 when all hold, else one line per problem and
    exit 1."""
    directory = Path(pick_model(model, export_dir, "verify", "griffin verify --model DIR"))
    prompts = gather_prompts(prompt, prompt_text) if prompt or prompt_text else None
    if prompts is None:
        report = verify_export(directory, original)
    else:
        report = verify_with_prompt(
            directory, prompts, original, max_prompt_tokens=max_prompt_tokens
        )
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
