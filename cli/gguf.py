"""``griffin gguf``: an export as one GGUF file for llama.cpp, through llama.cpp's converter."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from griffin_cli.export import human_bytes
from griffin_cli.main import (
    Outtype,
    app,
    err_console,
    model_option,
    out_console,
    pick_model,
    stage_progress,
    timeout_option,
)
from griffin_export.engines.llamacpp import DEFAULT_TIMEOUT, write_gguf

_STAGES = {"gguf": "Converting with llama.cpp's converter (%)"}


@app.command("gguf")
def gguf_command(
    export_dir: Path | None = typer.Argument(None, help="The export directory (griffin export)."),
    model: str | None = model_option("The export directory (same as the argument)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="GGUF file to write.", show_default="<export>-<outtype>.gguf"
    ),
    outtype: Outtype = typer.Option(
        "f16", "--outtype", help="Tensor type: f32, f16, bf16 or q8_0 (llama.cpp's converter)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    timeout: float = timeout_option(DEFAULT_TIMEOUT),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Write an export as a GGUF for llama.cpp (Ollama, LM Studio): uniform exports keep their
    family's architecture, per-layer (--budget protect) Llama-family exports become llama.cpp's
    'deci' with each layer's own FF width."""
    directory = pick_model(model, export_dir, "gguf", "griffin gguf EXPORT_DIR")
    with stage_progress(_STAGES, transient=as_json) as on_progress:
        result = write_gguf(
            directory,
            out,
            outtype,
            force=force,
            progress=on_progress,
            on_line=lambda line: on_progress.note("gguf", line),
            timeout=timeout,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    widths = sorted(set(result.ff_widths))
    width_text = str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]} per layer"
    out_console.print(
        f"[green]wrote[/] {escape(str(result.path))}: {result.architecture}, {result.outtype}, "
        f"FF {width_text}, {human_bytes(result.file_bytes)} ({result.seconds:.1f} s)",
        highlight=False,
        soft_wrap=True,
    )
