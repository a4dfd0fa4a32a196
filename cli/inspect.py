"""``griffin inspect``: the per-layer budget of an export, or the flocking heatmap of a layer."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from griffin_cli.export import human_bytes
from griffin_cli.main import app, model_option, out_console, pick_model
from griffin_export.errors import UsageError
from griffin_export.evaluation.inspection import (
    DROPPED_MARK,
    FILLED_MARK,
    KEPT_MARK,
    ExportSummary,
    Flocking,
    Routing,
    flocking_from,
    is_moe_model,
    shade,
    summarize_export,
)
from griffin_export.formats.exports import is_export


@app.command("inspect")
def inspect_command(
    model: str | None = model_option(
        "An export directory: print per-layer k, kept fraction and bytes saved (a mixture of "
        "experts: each layer's kept experts and the routing mass they carried). With --prompt: "
        "any model (as for export), whose flocking to draw (a mixture of experts: where the "
        "prompt is routed)."
    ),
    export_dir: Path | None = typer.Argument(None, hidden=True),  # old spelling of --model
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="Prompt file (UTF-8): draw the flocking heatmap instead."
    ),
    layer: int = typer.Option(
        0, "--layer", "-l", help="Layer of the heatmap (negative: from the end)."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Tokens drawn in the heatmap."),
    neurons: int = typer.Option(
        256, "--neurons", help="Heatmap: draw the first N neurons (0 = all)."
    ),
    sort: bool = typer.Option(
        False, "--sort", help="Heatmap: order neurons by GRIFFIN statistic, largest first."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG: the per-layer budget, or the flocking heatmap."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout."),
) -> None:
    """Show what an export kept per layer, or (--prompt, --layer) how a layer's FF neurons
    flock on a prompt. --plot draws it (needs matplotlib, the 'plot' extra)."""
    usage = "griffin inspect --model EXPORT_DIR, or --model M --prompt FILE --plot OUT.png"
    chosen = pick_model(model, export_dir, "inspect", usage)
    if prompt is not None:
        _flocking(chosen, prompt, layer, max_tokens, neurons, sort, plot, as_json)
        return
    if not is_export(chosen):
        raise UsageError(
            f"'{chosen}' is not a griffin export (no manifest); inspect an export directory, or "
            "draw a model's flocking with --prompt FILE --plot OUT.png"
        )
    summary = summarize_export(chosen)
    if plot is not None:
        _plot_budget(summary, plot)
    if as_json:
        typer.echo(json.dumps(_summary_dict(summary), indent=2))
        return
    out_console.print(_budget_table(summary) if summary.moe is None else _moe_table(summary))
    if plot is not None:
        out_console.print(f"wrote {plot}", highlight=False)


def _summary_dict(summary: ExportSummary) -> dict[str, Any]:
    """The table as JSON; of a mixture of experts, every layer says its kind and an MoE
    layer its kept experts, their marks, the routing mass kept, the filled and refitted
    experts, and ``moe`` holds the sizes and the expert score."""
    moe = summary.moe
    data: dict[str, Any] = {
        "directory": str(summary.directory),
        "model": summary.model,
        "ratio": summary.ratio,
        "budget": summary.budget,
        "kept_fraction": summary.kept_fraction,
        "bytes_saved": summary.bytes_saved,
        "layers": [],
    }
    for r in summary.rows:
        layer: dict[str, Any] = {
            "layer": r.layer,
            "k": r.k,
            "d_ff": r.d_ff,
            "kept_fraction": r.fraction,
            "bytes_saved": r.bytes_saved,
        }
        if moe is not None:
            row = moe.row(r.layer)
            layer["kind"] = "dense" if row is None else "moe"
            if row is not None:
                layer.update(row.to_dict())
        data["layers"].append(layer)
    if moe is not None:
        data["moe"] = {
            "sizes": moe.sizes,
            "expert_score": moe.expert_score,
            "mass_kept": moe.mass_kept,
        }
    return data


def _budget_table(summary: ExportSummary) -> Table:
    table = Table(
        title=f"{summary.directory}: {summary.model} ({summary.budget} budget, ratio "
        f"{summary.ratio:g})",
        title_justify="left",
    )
    for name in ("layer", "k", "d_ff", "kept", "bytes saved"):
        table.add_column(name, justify="right")
    for r in summary.rows:
        table.add_row(
            str(r.layer), str(r.k), str(r.d_ff), f"{r.fraction:.3f}", human_bytes(r.bytes_saved)
        )
    table.add_row(
        "all",
        str(sum(r.k for r in summary.rows)),
        str(sum(r.d_ff for r in summary.rows)),
        f"{summary.kept_fraction:.3f}",
        human_bytes(summary.bytes_saved),
    )
    return table


def _moe_table(summary: ExportSummary) -> Table:
    """Per layer of a mixture of experts: the kept experts marked among all (in index order,
    groups of 8), the share of the prompt's routing weight they carried, those filled in
    without routed tokens, the refitted count, and the FF neurons and bytes kept."""
    moe = summary.moe
    assert moe is not None
    sizes = moe.sizes
    table = Table(
        title=f"{summary.directory}: {summary.model} ({sizes['experts']} of "
        f"{sizes['experts_total']} routed experts, {sizes['width']} of {sizes['width_total']} "
        f"neurons each, by {moe.expert_score})",
        title_justify="left",
        caption=f"{KEPT_MARK} kept  {FILLED_MARK} kept, filled in (no prompt token routed to "
        f"it)  {DROPPED_MARK} removed; mass kept = share of the prompt's routing weight",
        caption_justify="left",
    )
    for name, justify in (
        ("layer", "right"),
        ("experts kept", "left"),
        ("mass kept", "right"),
        ("filled", "right"),
        ("refit", "right"),
        ("neurons kept", "right"),
        ("bytes saved", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in summary.rows:
        row = moe.row(r.layer)
        neurons = f"{r.k}/{r.d_ff}"
        if row is None:
            table.add_row(str(r.layer), "dense", "", "", "", neurons, human_bytes(r.bytes_saved))
            continue
        table.add_row(
            str(r.layer),
            row.marks(),
            f"{row.mass_kept:.3f}",
            str(len(row.filled)),
            str(row.refit),
            neurons,
            human_bytes(r.bytes_saved),
        )
    table.add_row(
        "all",
        "",
        f"{moe.mass_kept:.3f}",
        str(sum(len(r.filled) for r in moe.layers)),
        str(sum(r.refit for r in moe.layers)),
        f"{sum(r.k for r in summary.rows)}/{sum(r.d_ff for r in summary.rows)}",
        human_bytes(summary.bytes_saved),
    )
    return table


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed; run pip install "
            "'griffin-export[plot]' (or pip install matplotlib), or omit --plot"
        ) from None
    return plt


def _plot_budget(summary: ExportSummary, path: Path) -> None:
    plt = _pyplot()
    figure = budget_figure(summary, plt) if summary.moe is None else moe_figure(summary, plt)
    _save(figure, path, plt)


def moe_figure(summary: ExportSummary, plt: Any) -> Any:
    """A mixture of experts' choice as a picture: one row per MoE layer, one cell per routed
    expert (kept, kept without routed tokens, removed), and the routing mass kept per layer."""
    import torch
    from matplotlib.colors import ListedColormap

    moe = summary.moe
    assert moe is not None
    total = int(moe.sizes["experts_total"] or 0)
    grid = torch.zeros(len(moe.layers), total)
    for i, row in enumerate(moe.layers):
        grid[i, row.experts] = 2.0
        grid[i, row.filled] = 1.0
    width = max(7.0, min(total * 0.12, 24.0) + 3.0)
    fig, (ax, side) = plt.subplots(
        1,
        2,
        figsize=(width, max(3.0, len(moe.layers) * 0.3 + 2.0)),
        gridspec_kw={"width_ratios": [max(total, 12), 5]},
        sharey=True,
    )
    cmap = ListedColormap(["#dddddd", "#f4a261", "#1d3557"])
    ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(moe.layers)), [str(r.layer) for r in moe.layers])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    side.barh(range(len(moe.layers)), [r.mass_kept for r in moe.layers], color="#1d3557")
    side.set_xlim(0, 1)
    side.set_xlabel("routing mass kept")
    text = (
        f"{summary.model}: {moe.sizes['experts']} of {total} experts kept per layer "
        "(dark: kept; orange: kept, no prompt token routed to it; grey: removed)"
    )
    fig.suptitle(textwrap.fill(text, width=int(width * 9), break_on_hyphens=False))
    fig.tight_layout()
    return fig


def budget_figure(summary: ExportSummary, plt: Any) -> Any:
    """The per-layer kept fraction as bars: whole-layer ticks, the title wrapped to the width."""
    from matplotlib.ticker import MaxNLocator

    width = max(6.0, len(summary.rows) * 0.25)
    fig, ax = plt.subplots(figsize=(width, 3.5))
    layers = [r.layer for r in summary.rows]
    ax.bar(layers, [r.fraction for r in summary.rows], color="tab:blue", label="kept")
    ax.axhline(summary.kept_fraction, color="black", lw=1, ls="--", label="overall")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of d_ff")
    ax.set_ylim(0, 1.05)
    _title(ax, f"{summary.model}: {summary.budget} budget, ratio {summary.ratio:g}", width)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _title(ax: Any, text: str, inches: float) -> None:
    """A title wrapped to the figure's width (about 9 characters of 12 pt text per inch), so a
    long model path wraps instead of running off the figure."""
    ax.set_title(textwrap.fill(text, width=int(inches * 9), break_on_hyphens=False))


def _flocking(
    model: str,
    prompt: str,
    layer: int,
    max_tokens: int,
    neurons: int,
    sort: bool,
    plot: Path | None,
    as_json: bool,
) -> None:
    from griffin_export.build.prompts import read_prompt_file

    if plot is None and not as_json and not is_moe_model(model):
        raise UsageError("the flocking view is a picture: add --plot FILE.png (or --json)")
    plt = _pyplot() if plot is not None else None
    result = flocking_from(model, read_prompt_file(prompt), layer, max_tokens)
    if isinstance(result, Routing):
        _routing(result, model, plot, as_json, plt)
        return
    if plot is not None:
        _plot_flocking(result, neurons, sort, plot, plt)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "layer": result.layer,
                    "tokens": len(result.tokens),
                    "top_neurons": result.order[:32].tolist(),
                }
            )
        )
    else:
        out_console.print(f"wrote {plot}", highlight=False)


def _routing(result: Routing, model: str, plot: Path | None, as_json: bool, plt: Any) -> None:
    """A mixture of experts' routing of the prompt: per MoE layer, each expert's share of the
    routing weight (a row of shades, a heatmap with --plot, the numbers with --json)."""
    share = result.share
    if plot is not None:
        fig, ax = plt.subplots(
            figsize=(max(6.0, min(share.shape[1] * 0.12, 24.0) + 2.0), len(result.layers) * 0.3 + 2)
        )
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(result.layers)), [str(i) for i in result.layers])
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        _title(ax, f"{model}: share of the prompt's routing weight ({result.n_tokens} tokens)", 9)
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        _save(fig, plot, plt)
    if as_json:
        layers = [
            {
                "layer": layer,
                "mass": [round(float(v), 6) for v in result.mass[i]],
                "share": [round(float(v), 6) for v in share[i]],
                "tokens": result.tokens[i].tolist(),
            }
            for i, layer in enumerate(result.layers)
        ]
        typer.echo(json.dumps({"tokens": result.n_tokens, "layers": layers}))
        return
    if plot is not None:
        out_console.print(f"wrote {plot}", highlight=False)
        return
    table = Table(
        title=f"{model}: where {result.n_tokens} prompt tokens are routed",
        title_justify="left",
        caption="darker: more of the layer's routing weight (relative to its largest); blank: none",
        caption_justify="left",
    )
    for name, justify in (("layer", "right"), ("experts", "left"), ("top experts", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, layer in enumerate(result.layers):
        top = _top(share[i], 4)
        table.add_row(
            str(layer),
            shade(share[i]),
            ", ".join(f"{e} ({v:.2f})" for e, v in top),
        )
    out_console.print(table)


def _top(values: Any, k: int) -> list[tuple[int, float]]:
    """The ``k`` largest entries of a 1-D tensor as ``(index, value)``, largest first."""
    top = values.topk(min(k, values.numel()))
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]


def _plot_flocking(result: Flocking, neurons: int, sort: bool, path: Path, plt: Any) -> None:
    import torch

    order = result.order if sort else torch.arange(result.values.shape[1])
    if neurons > 0:
        order = order[:neurons]
    values = result.values[:, order]  # [T, N]
    vmax = float(torch.quantile(values.flatten(), 0.995)) or None
    fig, ax = plt.subplots(figsize=(9, max(3.0, values.shape[0] * 0.04 + 1.5)))
    image = ax.imshow(
        values.numpy(), aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=vmax
    )
    what = "by GRIFFIN statistic, largest first" if sort else "index"
    ax.set_xlabel(f"neuron ({what}; {values.shape[1]} of {result.values.shape[1]})")
    ax.set_ylabel("token")
    _title(
        ax,
        f"layer {result.layer}: normalised activations |z_t| / ||z_t|| "
        f"({values.shape[0]} tokens); vertical stripes = flocking",
        9,
    )
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> None:
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(
            f"cannot write --plot '{path}' ({exc.strerror}); choose another path"
        ) from exc
    finally:
        plt.close(fig)
