"""The Typer app: a table of verbs, and the one place library errors become exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from griffin_export import __version__
from griffin_export.core.budgets import BUDGETS
from griffin_export.engines.llamacpp import DEFAULT_TIMEOUT
from griffin_export.errors import GriffinError, UsageError

#: Progress, tables and errors go to stderr; stdout is reserved for results (--json).
err_console = Console(stderr=True)
out_console = Console()


#: The fixed choices the parser enforces (tests/test_cli_help.py keeps them equal to the
#: library's tables). Typer lists a ``Literal``'s values in ``--help`` and refuses others.
Dtype = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
Budget = Literal["uniform", "protect"]
Protocol = Literal["static", "griffin"]
Compensate = Literal["none", "refit", "refit-bias"]
ExpertScore = Literal["reap", "count"]
#: GGUF types: llama.cpp's converter's, then its quantizer's (engines.quantize.ALL_OUTTYPES)
Outtype = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "q3_k_m", "iq2_xxs"
]
BASELINES = ("magnitude", "random")

_DEBUG = "griffin_debug"  # key in click's Context.meta, which every nested context shares


def _set_debug(ctx: typer.Context, value: bool) -> bool:
    if value:
        ctx.meta[_DEBUG] = True
    return value


def _no_usage(ctx: Any) -> list[str]:
    return []


class _GriffinGroup(TyperGroup):
    """Maps every :class:`GriffinError` to one red line and its exit code (1, or 2 for usage),
    and gives every command the group's ``--debug`` so it works before or after the verb.
    Hidden arguments (old spellings kept as aliases) stay out of the usage line too."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        debug = next(p for p in self.params if p.name == "debug")
        for command in self.commands.values():
            if all(p.name != "debug" for p in command.params):
                command.params.append(debug)
            for param in command.params:
                if param.param_type_name == "argument" and getattr(param, "hidden", False):
                    param.get_usage_pieces = _no_usage  # type: ignore[method-assign]

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click)
        try:
            return super().invoke(ctx)
        except GriffinError as exc:
            if ctx.meta.get(_DEBUG) or os.environ.get("GRIFFIN_DEBUG"):
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
        callback=_set_debug,  # read by _GriffinGroup, which also adds it to every command
        expose_value=False,
        help="Show the traceback of an error (or set GRIFFIN_DEBUG=1).",
    ),
) -> None:
    """griffin: smaller checkpoints from the neurons a prompt actually uses."""
    # griffin draws its own progress; keep transformers' bars and notices off the terminal.
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


class StageProgress:
    """The ``(stage, done, total)`` callback the library functions take: one Rich bar per
    stage, labelled from ``labels``. :meth:`note` shows a line of detail after a stage's label
    (llama.cpp's converter's latest output line)."""

    #: characters of a note shown (the rest of the line would wrap the bar)
    NOTE_WIDTH = 60

    def __init__(self, bar: Progress, labels: dict[str, str]) -> None:
        self._bar = bar
        self._labels = labels
        self._tasks: dict[str, TaskID] = {}

    def _task(self, stage: str, total: int) -> TaskID:
        if stage not in self._tasks:
            label = escape(self._labels.get(stage, stage))
            self._tasks[stage] = self._bar.add_task(label, total=max(total, 1))
        return self._tasks[stage]

    def __call__(self, stage: str, done: int, total: int) -> None:
        self._bar.update(self._task(stage, total), completed=done, total=max(total, 1))

    def note(self, stage: str, text: str) -> None:
        short = text if len(text) <= self.NOTE_WIDTH else text[: self.NOTE_WIDTH - 3] + "..."
        label = escape(self._labels.get(stage, stage))
        self._bar.update(self._task(stage, 1), description=f"{label} [dim]{escape(short)}[/]")


@contextmanager
def stage_progress(labels: dict[str, str], transient: bool) -> Iterator[StageProgress]:
    """A Rich progress display on stderr with one bar per library stage; yields the
    ``(stage, done, total)`` callback the library functions take (:class:`StageProgress`)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
    ) as bar:
        yield StageProgress(bar, labels)


def model_option(help: str, default: str | None = None) -> Any:
    """``--model``/``-m``, the one name every command gives what it reads: a full model or an
    export directory."""
    return typer.Option(default, "--model", "-m", help=help)


def budgets_option(scope: str) -> Any:
    """``--budget``, repeatable or comma-separated, for commands that compare several budgets
    (``ppl``, ``eval``); ``scope`` names the protocol or mode it applies to."""
    return typer.Option(
        None,
        "--budget",
        callback=choice_list(BUDGETS),
        metavar="<uniform|protect>,...",
        help=f"{scope}: per-layer budget, uniform or protect (first and last layers dense, same "
        "total); repeatable, or comma-separated.",
        show_default="uniform",
    )


def alpha_option(scope: str) -> Any:
    """``--alpha``, the refit's ridge strength (``None``: the library's default by ratio)."""
    return typer.Option(
        None,
        "--alpha",
        show_default="1; 10 from keep 0.8 up",
        help=f"{scope}: ridge strength of the refit, relative to the kept neurons' mean energy.",
    )


def timeout_option(default: float | None) -> Any:
    """``--timeout SECONDS``: how long llama.cpp's converter may run (``griffin gguf``, and
    ``griffin export --gguf``, where ``None`` means not given)."""
    return typer.Option(
        default,
        "--timeout",
        metavar="SECONDS",
        show_default=f"{DEFAULT_TIMEOUT:g}",
        help="Stop llama.cpp's converter after this many seconds (its partial file removed); "
        "raise it for very large models.",
    )


def pick_model(model: str | None, positional: Path | None, command: str, usage: str) -> str:
    """``--model``, or the positional directory that ``verify`` and ``inspect`` took before
    (still accepted, no longer shown); exactly one of them, else a usage error naming ``usage``."""
    if model is not None and positional is not None:
        raise UsageError(
            f"pass the directory once: griffin {command} --model DIR, not also '{positional}'"
        )
    if model is None and positional is None:
        raise UsageError(f"griffin {command} needs --model: {usage}")
    return model if model is not None else str(positional)


def choice_list(choices: Sequence[str]) -> Callable[[list[str] | None], list[str] | None]:
    """Callback of a repeatable option whose values may also be comma-separated
    (``--baselines magnitude,random``): the flat list, or a parse-time error naming the
    choices."""

    def check(values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        flat = [name.strip() for item in values for name in item.split(",") if name.strip()]
        for name in flat:
            if name not in choices:
                raise typer.BadParameter(f"{name!r} is not one of {', '.join(map(repr, choices))}.")
        return flat

    return check


def plural(n: int, noun: str) -> str:
    """``1 window``, ``2 windows``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def run() -> None:
    """Console-script entry point."""
    app()


# Commands register themselves on import: one module per verb.
from griffin_cli import eval as _eval  # noqa: E402,F401
from griffin_cli import export as _export  # noqa: E402,F401
from griffin_cli import generate as _generate  # noqa: E402,F401
from griffin_cli import gguf as _gguf  # noqa: E402,F401
from griffin_cli import inspect as _inspect  # noqa: E402,F401
from griffin_cli import ppl as _ppl  # noqa: E402,F401
from griffin_cli import verify as _verify  # noqa: E402,F401
