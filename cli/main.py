"""The Typer app: a table of verbs, and the one place library errors become exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from griffin_export import __version__
from griffin_export.errors import GriffinError

ProgressCallback = Callable[[str, int, int], None]

#: Progress, tables and errors go to stderr; stdout is reserved for results (--json).
err_console = Console(stderr=True)
out_console = Console()


class _GriffinGroup(TyperGroup):
    """Maps every :class:`GriffinError` to one red line and its exit code (1, or 2 for usage)."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click)
        try:
            return super().invoke(ctx)
        except GriffinError as exc:
            if ctx.params.get("debug") or os.environ.get("GRIFFIN_DEBUG"):
                err_console.print_exception()
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="griffin",
    cls=_GriffinGroup,
    help="Export prompt-pruned (GRIFFIN) checkpoints of Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"griffin {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show the traceback of an error (or set GRIFFIN_DEBUG=1).",  # read by _GriffinGroup
    ),
) -> None:
    """griffin: smaller checkpoints from the neurons a prompt actually uses."""
    # griffin draws its own progress; keep transformers' bars and notices off the terminal.
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


@contextmanager
def stage_progress(labels: dict[str, str], transient: bool) -> Iterator[ProgressCallback]:
    """A Rich progress display on stderr with one bar per library stage; yields the
    ``(stage, done, total)`` callback the library functions take."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield on_progress


def run() -> None:
    """Console-script entry point."""
    app()


# Commands register themselves on import: one module per verb.
from griffin_cli import export as _export  # noqa: E402,F401
from griffin_cli import generate as _generate  # noqa: E402,F401
from griffin_cli import inspect as _inspect  # noqa: E402,F401
from griffin_cli import ppl as _ppl  # noqa: E402,F401
from griffin_cli import verify as _verify  # noqa: E402,F401
