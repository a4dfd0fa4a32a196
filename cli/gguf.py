"""``griffin gguf``: an export as one GGUF file for llama.cpp, through llama.cpp's converter
(and, for its 6- to 2-bit types, its quantizer)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from griffin_cli.export import (
    OUTTYPE_HELP,
    following_stage,
    human_bytes,
    imatrix_option,
    imatrix_text,
)
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
from griffin_export.build.prompts import gather_prompts
from griffin_export.engines.llamacpp import DEFAULT_TIMEOUT, GgufResult
from griffin_export.engines.quantize import write_gguf_typed

_STAGES = {
    "gguf": "Converting with llama.cpp's converter (%)",
    "imatrix": "Importance matrix from the prompt",
    "quantize": "Quantizing with llama.cpp's quantizer (%)",
}


@app.command("gguf")
def gguf_command(
    export_dir: Path | None = typer.Argument(None, help="The export directory (griffin export)."),
    model: str | None = model_option("The export directory (same as the argument)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="GGUF file to write.", show_default="<export>-<outtype>.gguf"
    ),
    outtype: Outtype = typer.Option("f16", "--outtype", help=f"Tensor type: {OUTTYPE_HELP}"),
    imatrix: str | None = imatrix_option("prompt below q6_k with --prompt, else none"),
    prompt: list[str] | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="Prompt file (UTF-8; repeatable; '-' reads stdin) for --imatrix prompt: the one the "
        "export was made from.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    timeout: float = timeout_option(DEFAULT_TIMEOUT),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Write an export as a GGUF for llama.cpp (Ollama, LM Studio): uniform exports keep their
    family's architecture, per-layer (--budget protect) Llama-family exports become llama.cpp's
    'deci' with each layer's own FF width. Types below q8_0 are written by llama.cpp's quantizer,
    with an importance matrix from --prompt."""
    directory = pick_model(model, export_dir, "gguf", "griffin gguf EXPORT_DIR")
    prompts = gather_prompts(prompt, None) if prompt else []
    with stage_progress(_STAGES, transient=as_json) as on_progress:
        progress, on_line = following_stage(on_progress)
        result = write_gguf_typed(
            directory,
            out,
            outtype,
            force=force,
            imatrix=imatrix,
            prompts=prompts,
            progress=progress,
            on_line=on_line,
            timeout=timeout,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out_console.print(
        f"[green]wrote[/] {escape(str(result.path))}: {escape(describe_gguf(result))}",
        highlight=False,
        soft_wrap=True,
    )


def describe_gguf(result: GgufResult) -> str:
    """``llama, q4_k_m, FF 1280, imatrix prompt (164 tokens), 88.0 MB (12.1 s)``."""
    widths = sorted(set(result.ff_widths))
    width_text = str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]} per layer"
    parts = [result.architecture, result.outtype, f"FF {width_text}"]
    if result.imatrix is not None:
        parts.append(f"imatrix {imatrix_text(result.imatrix)}")
    return f"{', '.join(parts)}, {human_bytes(result.file_bytes)} ({result.seconds:.1f} s)"
