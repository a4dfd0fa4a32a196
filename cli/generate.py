"""``griffin generate``: stream text from an export, refreshing experts from the original."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any

import typer

from griffin_cli.main import app, err_console
from griffin_export.build.prompts import gather_prompts
from griffin_export.errors import UsageError
from griffin_export.runtime.refresh import GriffinRuntime, TextStream


class Events(str, Enum):
    """How much of each refresh event ``--json`` records."""

    counts = "counts"
    full = "full"


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", "-m", help="An export directory."),
    original: str | None = typer.Option(
        None,
        "--original",
        help="The export's full model.",
        show_default="the manifest's source",
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", "-p", help="Prompt file (UTF-8); '-' reads stdin."
    ),
    prompt_text: list[str] | None = typer.Option(None, "--prompt-text", "-t", help="Prompt text."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate."),
    refresh: int = typer.Option(
        64, "--refresh", help="Re-select experts every N generated tokens (0 = never)."
    ),
    window: int = typer.Option(128, "--window", "-W", help="Re-select from the last W tokens."),
    refit_on_refresh: bool | None = typer.Option(
        None,
        "--refit-on-refresh/--no-refit-on-refresh",
        help="On a compensated export: refit the down projections on the window at each "
        "refresh, or use the original's plain columns for every layer whose experts changed.",
        show_default="refit on compensated exports",
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k likeliest (0 = off)."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for sampling (none: drawn at random, and reported)."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Wrap the prompt as a user turn in the tokenizer's chat template."
    ),
    events: Events = typer.Option(
        Events.counts,
        "--events",
        help="With --json, per refresh and layer: counts (overlap, neurons changed) or full "
        "(also the kept indices).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead."),
) -> None:
    """Generate with an export, re-slicing its experts from the full weights as it goes."""
    if events is Events.full and not as_json:
        raise UsageError("--events full lists the kept indices in the JSON result; add --json")
    text = "\n\n".join(gather_prompts(prompt, prompt_text))
    with err_console.status("Loading export and mapping the original", spinner="dots"):
        runtime = GriffinRuntime.from_export(
            model, original, device=device, refit_on_refresh=refit_on_refresh
        )
    tokenizer: Any = runtime.tokenizer  # generate() refuses an export without one
    streamer = None if as_json else TextStream(tokenizer, _write)

    result = runtime.generate(
        text,
        max_new_tokens,
        refresh_every=refresh,
        window=window,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        chat=chat,
        record_kept=events is Events.full,
        on_token=None if streamer is None else streamer.put,
    )
    if streamer is None:
        typer.echo(json.dumps(result.to_dict()))
        return
    streamer.end()
    _write("\n")
    overlaps = [e.mean_overlap for e in result.refreshes]
    mean = f", mean overlap {sum(overlaps) / len(overlaps):.3f}" if overlaps else ""
    seeded = "" if result.seed is None else f", seed {result.seed}"
    if runtime.moe:  # whole routed experts swapped in, over all refreshes and layers
        mean += f", {sum(e.total_swapped for e in result.refreshes)} expert swaps"
    err_console.print(
        f"[dim]{len(result.token_ids)} tokens in {result.seconds:.1f} s "
        f"({result.tokens_per_second:.1f} tok/s), {len(result.refreshes)} refreshes{mean}"
        f"{seeded}[/]",
        highlight=False,
        soft_wrap=True,  # one line: the terminal wraps it, rich inserts no newlines
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
