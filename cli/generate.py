"""``griffin generate``: stream text from an export, refreshing experts from the original."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from griffin_cli.main import app, err_console
from griffin_export.prompts import gather_prompts
from griffin_export.runtime import GriffinRuntime


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
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k likeliest (0 = off)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead."),
) -> None:
    """Generate with an export, re-slicing its experts from the full weights as it goes."""
    text = "\n\n".join(gather_prompts(prompt, prompt_text))
    with err_console.status("Loading export and mapping the original", spinner="dots"):
        runtime = GriffinRuntime.from_export(model, original, device=device)
    tokenizer: Any = runtime.tokenizer  # generate() refuses an export without one
    shown = ""
    produced: list[int] = []

    def on_token(token: int) -> None:
        nonlocal shown
        if as_json:
            return
        produced.append(token)
        decoded = tokenizer.decode(produced, skip_special_tokens=True)
        sys.stdout.write(decoded[len(shown) :])
        sys.stdout.flush()
        shown = decoded

    result = runtime.generate(
        text,
        max_new_tokens,
        refresh_every=refresh,
        window=window,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        on_token=on_token,
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    sys.stdout.write("\n")
    overlaps = [e.mean_overlap for e in result.refreshes]
    mean = f", mean overlap {sum(overlaps) / len(overlaps):.3f}" if overlaps else ""
    err_console.print(
        f"[dim]{len(result.token_ids)} tokens in {result.seconds:.1f} s "
        f"({result.tokens_per_second:.1f} tok/s), {len(result.refreshes)} refreshes{mean}[/]",
        highlight=False,
    )
