"""What every command's ``--help`` shows, which values the parser refuses, and the names the
commands share (``--model``, ``--debug``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import pytest
import typer
from typer.testing import CliRunner, Result

from griffin_cli import ppl as ppl_module
from griffin_cli.eval import EvalMode
from griffin_cli.main import (
    BASELINES,
    Budget,
    Compensate,
    Dtype,
    ExpertScore,
    Outtype,
    Protocol,
    app,
)
from griffin_export.core.budgets import BUDGETS, check_budget
from griffin_export.core.compensation import METHODS
from griffin_export.core.moe_selection import EXPERT_SCORES
from griffin_export.engines.quantize import ALL_OUTTYPES
from griffin_export.errors import UsageError
from griffin_export.storage.loading import DTYPE_OPTIONS, parse_dtype

runner = CliRunner()
WIDE = {"COLUMNS": "200", "GRIFFIN_DEBUG": None}
COMMANDS = ("export", "ppl", "generate", "verify", "inspect", "eval", "gguf")


def griffin(*args: str) -> Result:
    return runner.invoke(app, list(args), env=WIDE)


def flat(text: str) -> str:
    """Help text with ANSI codes and Rich's box borders removed and all whitespace runs made
    one space, so a help string wrapped over several rows reads as one line again."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"[│╭╮╰╯─]", " ", text)
    return " ".join(text.split())


def click_command(name: str | None) -> Any:
    group = typer.main.get_command(app)
    return group if name is None else group.commands[name]  # type: ignore[attr-defined]


def option_row(help_text: str, option: str) -> str:
    """The rendered row that declares ``option`` (its first line)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", help_text)
    rows = [line for line in plain.splitlines() if re.match(rf"^│\s+(\*\s+)?{option}\s", line)]
    assert len(rows) == 1, (option, plain)
    return rows[0]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_string_is_rendered_in_full(command: str | None) -> None:
    """Each option's help, its custom default text and the command's description appear in
    the rendered --help word for word. Expected text comes from the click params, not from the
    renderer. Catches help strings that Rich swallows as markup (``[default: ...]`` inside a
    help string rendered "Output directory ." for --out), or any other lost text."""
    args = ["--help"] if command is None else [command, "--help"]
    result = griffin(*args)
    assert result.exit_code == 0, result.output
    shown = flat(result.output)
    cmd = click_command(command)
    assert flat(cmd.help or "") in shown
    checked = 0
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option":
            continue
        assert param.help, f"{command} {param.opts} has no help"
        assert flat(param.help) in shown, (param.opts, param.help)
        if isinstance(param.show_default, str):
            assert param.show_default in shown, (param.opts, param.show_default)
        checked += 1
    assert checked >= 2


# -- fixed choices ---------------------------------------------------------------------------

CHOICES = [
    ("export", "--dtype", get_args(Dtype)),
    ("export", "--budget", get_args(Budget)),
    ("ppl", "--dtype", get_args(Dtype)),
    ("ppl", "--protocol", get_args(Protocol)),
    ("ppl", "--budget", get_args(Budget)),
    ("ppl", "--baselines", BASELINES),
    ("eval", "--mode", get_args(EvalMode)),
    ("eval", "--budget", get_args(Budget)),
    ("eval", "--dtype", get_args(Dtype)),
    ("export", "--compensate", get_args(Compensate)),
    ("ppl", "--compensate", get_args(Compensate)),
    ("export", "--gguf", get_args(Outtype)),
    ("gguf", "--outtype", get_args(Outtype)),
    ("export", "--expert-score", get_args(ExpertScore)),
]


@pytest.mark.parametrize(("command", "option", "choices"), CHOICES)
def test_choices_are_listed_in_help(command: str, option: str, choices: tuple[str, ...]) -> None:
    """The option's own row in --help names every choice. Catches a plain ``str`` option
    whose choices are known only to the library (shown as ``<str>``)."""
    row = option_row(griffin(command, "--help").output, option)
    for choice in choices:
        assert choice in row, (option, choice, row)


@pytest.mark.parametrize(("command", "option", "choices"), CHOICES)
def test_unknown_choice_is_a_parse_error_naming_the_choices(
    command: str, option: str, choices: tuple[str, ...], tmp_path: Path
) -> None:
    """A value outside the choices exits 2 with click's "Invalid value for '--x'" (so before
    the command runs: the model does not exist, which the library would report as exit 1),
    naming the bad value and every choice. Catches validation left to the library, and a
    comma-list callback that checks only the first item."""
    missing = str(tmp_path / "no-such-model")
    value = "uniform,nonsense" if option == "--budget" and command != "export" else "nonsense"
    if option == "--baselines":
        value = "random,nonsense"
    extra = {"export": ["--prompt-text", "x"], "eval": ["--tasks", "x"]}.get(command, [])
    result = griffin(command, "--model", missing, option, value, *extra)
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f"Invalid value for '{option}'" in text and "'nonsense'" in text
    for choice in choices:
        assert f"'{choice}'" in text, (choice, text)


def test_comma_separated_and_repeated_choices_reach_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--budget a,b`` and repeated ``--baselines`` arrive as one flat list, defaults as the
    library's. Catches a callback that drops repeats, keeps the comma-joined string, or
    forgets to strip spaces."""
    seen: list[dict[str, Any]] = []

    def fake_perplexity(model: str, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise UsageError("stop here")

    monkeypatch.setattr(ppl_module, "perplexity", fake_perplexity)
    args = ["ppl", "--budget", "uniform, protect", "--baselines", "magnitude"]
    assert griffin(*args, "--baselines", "random").exit_code == 2
    assert seen[0]["budgets"] == ["uniform", "protect"]
    assert seen[0]["baselines"] == ["magnitude", "random"]
    assert griffin("ppl").exit_code == 2
    assert seen[1]["budgets"] is None and seen[1]["baselines"] == []  # library: uniform
    assert seen[1]["dtype"] == "auto" and seen[1]["protocol"] is None


def test_cli_choices_are_the_library_tables() -> None:
    """The parser offers exactly what the library accepts: every dtype and budget choice is
    accepted by the library's own parser, and every library dtype and budget is offered.
    Catches the two drifting apart (a library dtype the CLI refuses, or a CLI choice the
    library then rejects with exit 2 after loading the model)."""
    assert set(get_args(Dtype)) == {"auto", *DTYPE_OPTIONS}
    for name in get_args(Dtype):
        parse_dtype(name)
    assert get_args(Budget) == tuple(BUDGETS)
    for name in get_args(Budget):
        check_budget(name)
    assert get_args(Compensate) == METHODS
    assert get_args(ExpertScore) == EXPERT_SCORES
    assert get_args(Outtype) == ALL_OUTTYPES


# -- the same names in every command ---------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_its_model_with_dash_dash_model(command: str) -> None:
    """Export, ppl, generate, verify and inspect all name what they read ``--model``/``-m``.
    Catches verify/inspect taking the export only as a positional argument while ppl and
    generate take ``--model``."""
    opts = [p.opts for p in click_command(command).params if p.name == "model"]
    assert opts and set(opts[0]) == {"--model", "-m"}


def test_verify_and_inspect_take_dash_dash_model_and_the_old_positional(
    tmp_path: Path,
) -> None:
    """``--model DIR`` and the old ``DIR`` both work; both at once, or neither, is a one-line
    usage error. Catches an alias that shadows --model, or silently prefers one of the two."""
    from griffin_export import export

    from tiny import save_tiny

    source = save_tiny("llama", tmp_path / "src")
    exp = str(tmp_path / "exp")
    export(str(source), ["the quick brown fox"], 0.5, out=exp)
    for command in ("verify", "inspect"):
        assert griffin(command, "--model", exp).exit_code == 0
        assert griffin(command, exp).exit_code == 0
        both = griffin(command, exp, "--model", str(source))
        assert both.exit_code == 2 and "pass the directory once" in both.output
        neither = griffin(command)
        assert neither.exit_code == 2 and f"griffin {command} needs --model" in neither.output
        for result in (both, neither):
            assert len(result.output.strip().splitlines()) == 1, result.output
    not_export = griffin("inspect", "--model", str(source))
    assert not_export.exit_code == 2 and "is not a griffin export" in not_export.output


@pytest.mark.parametrize("command", ["export", "ppl", "generate", "inspect"])
def test_debug_works_before_and_after_the_command(command: str, tmp_path: Path) -> None:
    """``griffin --debug CMD`` and ``griffin CMD --debug`` both print the traceback of a
    library error (a missing model); without it, one line. Catches --debug accepted only on
    the group (before: "No such option: --debug" after the verb) or accepted but ignored.
    (verify reports a missing directory as a problem line, not an error, so it is not here.)"""
    args = [command, "--model", str(tmp_path / "gone")]
    if command in ("export", "generate"):
        args += ["--prompt-text", "x"]
    plain = griffin(*args)
    assert plain.exit_code in (1, 2) and "Traceback" not in plain.output, plain.output
    for debug_args in (["--debug", *args], [*args, "--debug"]):
        result = griffin(*debug_args)
        assert result.exit_code == plain.exit_code, result.output
        assert "Traceback" in result.output and "error:" in result.output
