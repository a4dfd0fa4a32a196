"""`griffin inspect`: the per-layer table of uniform and per-layer exports, and the plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from griffin_export.core.scoring import keep_count

from tiny import D_FF, LAYERS


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from griffin_export import export

    from tiny import save_tiny

    root = tmp_path_factory.mktemp("inspect")
    source = save_tiny("llama", root / "src")
    export(str(source), ["the quick brown fox jumps over the lazy dog"], 0.5, out=root / "exp")
    return source, root / "exp"


def test_inspect_export_table_and_json(tiny_export: tuple[Path, Path]) -> None:
    import json

    from typer.testing import CliRunner

    from griffin_cli.main import app

    _, exp = tiny_export
    result = CliRunner().invoke(app, ["inspect", str(exp), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    k = keep_count(D_FF, 0.5)
    assert [row["k"] for row in data["layers"]] == [k] * LAYERS
    # llama: gate + up rows and down columns, hidden 32, float32
    assert data["layers"][0]["bytes_saved"] == (D_FF - k) * 3 * 32 * 4
    table = CliRunner().invoke(app, ["inspect", str(exp)])
    assert table.exit_code == 0 and "bytes saved" in table.stdout


def test_inspect_plots(tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from griffin_cli.main import app

    source, exp = tiny_export
    budget_png, heat_png = tmp_path / "b.png", tmp_path / "h.png"
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello world, flocking neurons.")
    runner = CliRunner()
    assert runner.invoke(app, ["inspect", str(exp), "--plot", str(budget_png)]).exit_code == 0
    result = runner.invoke(
        app,
        [
            "inspect",
            "--model",
            str(source),
            "--prompt",
            str(prompt),
            "--layer",
            "-1",
            "--plot",
            str(heat_png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert budget_png.stat().st_size > 1000 and heat_png.stat().st_size > 1000


def test_inspect_without_matplotlib_says_how_to_install(
    tiny_export: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    from typer.testing import CliRunner

    from griffin_cli.main import app

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    source, exp = tiny_export
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    png = str(tmp_path / "x.png")
    for args in (
        [str(exp), "--plot", png],
        ["--model", str(source), "--prompt", str(prompt), "--plot", png],
    ):
        result = CliRunner().invoke(app, ["inspect", *args])
        assert result.exit_code == 2, result.output
        assert (
            "--plot needs matplotlib" in result.output and "griffin-export[plot]" in result.output
        )
        assert len(result.output.strip().splitlines()) == 1  # one line, no traceback


def test_inspect_bad_layer(tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from griffin_cli.main import app

    source, _ = tiny_export
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    result = CliRunner().invoke(
        app, ["inspect", "--model", str(source), "--prompt", str(prompt), "--layer", "7", "--json"]
    )
    assert result.exit_code == 2 and "--layer 7" in result.output


def test_inspect_a_per_layer_export(tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from griffin_cli.main import app
    from griffin_export import export

    source, _ = tiny_export
    out = tmp_path / "protect"
    export(str(source), ["the quick brown fox"], 0.8, out=out, budget="protect")
    result = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["budget"] == "protect"
    assert [row["k"] for row in data["layers"]] == [37, 16, 37]
    assert [row["bytes_saved"] for row in data["layers"]] == [0, (37 - 16) * 3 * 32 * 4, 0]
    assert data["kept_fraction"] == pytest.approx(90 / 111)
    png = tmp_path / "budget.png"  # matplotlib: the 'plot' extra, which make install installs
    plotted = CliRunner().invoke(app, ["inspect", str(out), "--plot", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.stat().st_size > 1000


def test_budget_plot_has_whole_layer_ticks_and_a_title_inside_the_figure() -> None:
    """Three layers and a long model path: every x tick is a whole layer number and the title,
    drawn, lies inside the figure. Catches matplotlib's default locator (ticks at 0.5, 1.5 for
    a few layers) and an unwrapped title that runs off both edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from griffin_cli.inspect import budget_figure
    from griffin_export.evaluation.inspection import ExportSummary, LayerRow

    rows = [LayerRow(i, k, 96, k * 100, (96 - k) * 100) for i, k in enumerate((96, 40, 96))]
    model = "/data/models/" + "a-rather-long-directory-name/" * 4 + "SmolLM2-135M-Instruct"
    summary = ExportSummary(Path("exp"), model, "llama", 0.8, "protect", rows)
    fig = budget_figure(summary, plt)
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        fig.canvas.draw()
        box = ax.title.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
        assert box.y0 >= 0 and box.y1 <= fig.bbox.height, (box, fig.bbox)
        assert "SmolLM2-135M-Instruct" in ax.get_title().replace("\n", "")
    finally:
        plt.close(fig)


def test_flocking_from_a_model_path_is_the_flocking_of_the_loaded_model(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """flocking_from (the library side of inspect --prompt) equals flocking() on the model and
    tokenizer loaded by hand, and refuses --max-tokens 0 before loading anything (a model
    path that does not exist is not reached). Catches the loading or the checks living only
    in the CLI, or max_tokens ignored."""
    import torch

    from griffin_export.errors import UsageError
    from griffin_export.evaluation.inspection import flocking, flocking_from
    from griffin_export.storage.loading import load_model
    from griffin_export.storage.sources import resolve_source

    source, _ = tiny_export
    text = "hello world, flocking neurons."
    got = flocking_from(str(source), text, -1, 7)
    loaded = load_model(resolve_source(str(source)))
    want = flocking(loaded.model, loaded.tokenizer, text, -1, 7)
    assert len(got.tokens) == 7 and got.layer == want.layer
    assert torch.equal(got.values, want.values) and torch.equal(got.order, want.order)
    with pytest.raises(UsageError, match="--max-tokens must be at least 1, got 0"):
        flocking_from(str(tmp_path / "no-such-model"), text, 0, 0)
