"""``griffin export``: thin wrapper over :func:`griffin_export.build.export` with Rich output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import typer
from rich.table import Table

from griffin_cli.main import (
    Budget,
    Compensate,
    Dtype,
    ExpertScore,
    Outtype,
    StageProgress,
    app,
    err_console,
    model_option,
    out_console,
    stage_progress,
    timeout_option,
)
from griffin_export.build.export import ExportResult, export
from griffin_export.build.prompts import gather_prompts
from griffin_export.core.budgets import DEFAULT_BUDGET
from griffin_export.core.compensation import DEFAULT_METHOD
from griffin_export.core.moe_selection import DEFAULT_EXPERT_SCORE
from griffin_export.engines.llamacpp import Progress
from griffin_export.formats.manifest import DEFAULT_CHECKPOINT_FORMAT
from griffin_export.storage.sources import DEFAULT_MODEL

#: ``--format`` choices (griffin_export.formats.manifest.CHECKPOINT_FORMATS)
CheckpointFormat = Literal["hf", "decilm"]

_STAGES = {
    "convert": "Converting GGUF (once; cached)",
    "load": "Loading model",
    "score": "Scoring prompt",
    "slice": "Slicing FF layers",
    "write": "Writing export",
    "gguf": "GGUF via llama.cpp's converter (%)",
    "imatrix": "Importance matrix from the prompt",
    "quantize": "Quantizing with llama.cpp's quantizer (%)",
}

#: --outtype / --gguf help: every type, what writes it, and the imatrix default.
OUTTYPE_HELP = (
    "f32, f16, bf16, q8_0 (llama.cpp's converter); q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, q3_k_m, "
    "iq2_xxs (its quantizer, from f16; needs llama-cpp-python, griffin-export's llama extra; "
    "K/IQ types want FF widths in multiples of 256)."
)
IMATRIX_HELP = (
    "Importance matrix for the quantizer: prompt (per-column input energy of every weight over "
    "the prompt, on the export itself), none, or an imatrix FILE from llama-imatrix."
)


def imatrix_option(default_text: str) -> Any:
    """``--imatrix prompt|none|FILE`` (``griffin gguf`` and ``griffin export --gguf``)."""
    return typer.Option(
        None, "--imatrix", metavar="prompt|none|FILE", show_default=default_text, help=IMATRIX_HELP
    )


def following_stage(on_progress: StageProgress) -> tuple[Progress, Callable[[str], None]]:
    """A progress callback and a line callback for llama.cpp's tools: each line is shown on
    the bar of the stage that last reported (the converter's, then the quantizer's)."""
    current = ["gguf"]

    def progress(stage: str, done: int, total: int) -> None:
        current[0] = stage
        on_progress(stage, done, total)

    return progress, lambda line: on_progress.note(current[0], line)


@app.command("export")
def export_command(
    model: str = model_option(
        "Hub id, local HF directory, .gguf file, or the embedded 'smollm2-135m'.", DEFAULT_MODEL
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", "-p", help="Prompt file (UTF-8); repeatable; '-' reads stdin."
    ),
    prompt_text: list[str] | None = typer.Option(
        None, "--prompt-text", "-t", help="Prompt text; repeatable. All prompts are pooled."
    ),
    ratio: float = typer.Option(
        0.5,
        "--ratio",
        "-r",
        help="Fraction of FF neurons kept, in (0, 1] (in a mixture of experts: of every "
        "expert, shared expert and dense layer).",
    ),
    experts: float = typer.Option(
        1.0,
        "--experts",
        "-e",
        help="Mixtures of experts: fraction of the routed experts kept per layer, in (0, 1].",
    ),
    expert_score: ExpertScore = typer.Option(
        DEFAULT_EXPERT_SCORE,
        "--expert-score",
        help="Mixtures of experts: rank experts by REAP's router-weighted output norm "
        "(reap) or by routed prompt tokens (count).",
    ),
    multiple_of: int | None = typer.Option(
        None,
        "--multiple-of",
        show_default="1; 256 with a K or IQ --gguf type",
        help="Round the kept count to a multiple of N (never above d_ff).",
    ),
    budget: Budget = typer.Option(
        DEFAULT_BUDGET,
        "--budget",
        help="uniform (same k in every layer; stock from_pretrained loads it) or protect "
        "(first and last layers dense, the rest share the same total; load with "
        "griffin_export.load_pretrained).",
    ),
    compensate: Compensate = typer.Option(
        DEFAULT_METHOD,
        "--compensate",
        help="Repair the pruned layers: refit (the kept neurons' down-projection columns refitted "
        "on the prompt in closed form; same shapes, stock-loadable), refit-bias (also a down "
        "bias; families whose down projection has one), none (plain slices).",
    ),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        show_default="1; 10 from keep 0.8 up",
        help="Ridge strength of the refit, relative to the kept neurons' mean energy.",
    ),
    checkpoint_format: CheckpointFormat = typer.Option(
        DEFAULT_CHECKPOINT_FORMAT,
        "--format",
        help="Checkpoint layout: hf (the model family's own config) or decilm (DeciLM / "
        "Nemotron-NAS block_configs, which vLLM and llama.cpp's converter read; Llama-graph "
        "families, every layer's width a multiple of 256, e.g. --multiple-of 256).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output directory, written atomically.",
        show_default="<model>-griffin-<ratio>",
    ),
    dtype: Dtype = typer.Option(
        "auto",
        "--dtype",
        case_sensitive=False,
        help="Weight dtype of the export; auto keeps the source's.",
    ),
    device: str = typer.Option("cpu", "--device", help="Device that runs the prompt: cpu, cuda..."),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", help="Truncate each prompt to N tokens."
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB or 500MB."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow .bin/.pt (pickle) weights; they can run code."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow model code shipped with the checkpoint."
    ),
    in_memory: bool = typer.Option(
        False,
        "--in-memory",
        help="Load the whole model instead of streaming it block by block (same output).",
    ),
    gguf: Outtype | None = typer.Option(
        None,
        "--gguf",
        help="Also write model-<type>.gguf inside the export for llama.cpp (as griffin gguf): "
        + OUTTYPE_HELP,
    ),
    imatrix: str | None = imatrix_option("prompt below q6_k, else none"),
    timeout: float | None = timeout_option(None),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Prune every FF layer to the neurons the prompt uses and write a smaller checkpoint."""
    prompts = gather_prompts(prompt, prompt_text)
    with stage_progress(_STAGES, transient=as_json) as on_progress:
        progress, on_line = following_stage(on_progress)
        result = export(
            model,
            prompts,
            ratio,
            experts=experts,
            expert_score=expert_score,
            out=out,
            multiple_of=multiple_of,
            budget=budget,
            dtype=dtype,
            device=device,
            max_prompt_tokens=max_prompt_tokens,
            force=force,
            max_shard_size=max_shard_size,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            streaming=False if in_memory else None,
            compensate=compensate,
            alpha=alpha,
            checkpoint_format=checkpoint_format,
            gguf=gguf,
            gguf_timeout=timeout,
            gguf_on_line=on_line,
            gguf_imatrix=imatrix,
            progress=progress,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out_console.print(summary_table(result))


def summary_table(result: ExportResult) -> Table:
    """Layers, d_ff -> k, parameters and bytes before/after."""
    ks = sorted(set(result.k_per_layer))
    k_text = str(ks[0]) if len(ks) == 1 else f"{ks[0]}..{ks[-1]}"
    table = Table(title=f"griffin export -> {result.out_dir}", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after/before", justify="right")
    table.add_row("model", result.source, f"{result.model_type}, {result.dtype}", "")
    table.add_row("layers", str(result.n_layers), str(result.n_layers), "")
    table.add_row("budget", "", result.budget, "")
    if result.checkpoint_format != DEFAULT_CHECKPOINT_FORMAT:
        table.add_row("format", "", result.checkpoint_format, "")
    how = result.compensation
    table.add_row(
        "compensation",
        "",
        "none" if how is None else f"{how['method']}, alpha {how['alpha']:g}",
        "",
    )
    if result.moe is not None:
        sizes = result.moe["sizes"]
        table.add_row(
            "routed experts",
            str(sizes["experts_total"]),
            str(sizes["experts"]),
            f"{sizes['experts'] / sizes['experts_total']:.3f}",
        )
        for label, key in (("expert width", "width"), ("shared", "shared"), ("dense FF", "dense")):
            if sizes[key] is not None:
                total = sizes[f"{key}_total"]
                table.add_row(label, str(total), str(sizes[key]), f"{sizes[key] / total:.3f}")
    else:
        kept = sum(result.k_per_layer) / (result.n_layers * result.d_ff)
        table.add_row("d_ff -> k", str(result.d_ff), k_text, f"{kept:.3f}")
    table.add_row(
        "parameters",
        f"{result.params_before:,}",
        f"{result.params_after:,}",
        f"{result.params_after / result.params_before:.3f}",
    )
    table.add_row(
        "weight bytes",
        human_bytes(result.bytes_before),
        human_bytes(result.file_bytes),
        f"{result.file_bytes / result.bytes_before:.3f}",
    )
    table.add_row("prompt tokens", str(result.prompt_tokens), "", "")
    if result.gguf is not None:
        gguf = result.gguf
        imatrix_used = gguf.get("imatrix")
        table.add_row(
            "gguf",
            "",
            f"{gguf['architecture']}, {gguf['outtype']}"
            + (f", imatrix {imatrix_text(imatrix_used)}" if imatrix_used else ""),
            human_bytes(gguf["file_bytes"]),
        )
    table.caption = f"{result.seconds:.1f} s"
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def imatrix_text(record: dict[str, object]) -> str:
    """``prompt (164 tokens)``, ``file imatrix.gguf`` or ``none``."""
    if record.get("source") == "prompt":
        return f"prompt ({record.get('tokens')} tokens)"
    if record.get("source") == "file":
        return f"file {Path(str(record.get('file'))).name}"
    return "none"
