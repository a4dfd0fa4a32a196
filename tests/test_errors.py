"""Bad input through the CLI: one line naming the value and the fix, exit code 2 (usage) or 1
(failure), no traceback, and nothing written. One test per row of docs/errors.md's table."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

import griffin_export
from griffin_cli.main import app
from griffin_export import export, prune_model, top_k_indices
from griffin_export.build.prompts import read_prompt_file
from griffin_export.core.architectures import spec_for
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import refit_down, regression
from griffin_export.errors import ModelLoadError, UsageError
from griffin_export.evaluation.corpora import load_corpus
from griffin_export.formats.layout import prune_model_per_layer
from griffin_export.runtime.refresh import GriffinRuntime

from tiny import save_tiny, tiny_model

runner = CliRunner()
TEXT = ["--prompt-text", "Rain falls on the hills."]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("errors") / "src")


def griffin(*args: str) -> Result:
    # GRIFFIN_DEBUG=None: --debug sets it inside a run; the runner restores it afterwards.
    return runner.invoke(app, list(args), env={"GRIFFIN_DEBUG": None, "COLUMNS": "300"})


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its sha256: 'unchanged' means equal digests."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def assert_refused(result: Result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error:`` line holding every needle, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def export_args(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["export", "--model", str(model), *extra, "--out", str(out)]


# -- the model -------------------------------------------------------------------------------


def test_missing_model_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(tmp_path / "no-such-model", out, *TEXT))
    assert_refused(result, 1, "no-such-model", "not found", "pass a local model directory")
    assert not out.exists()


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    result = griffin(*export_args(tmp_path / "weights", out, *TEXT))
    assert_refused(result, 1, "has no config.json", "found: model.safetensors", "--model")
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["bert", "not_a_real_type"])
def test_unsupported_model_type(src: Path, tmp_path: Path, model_type: str) -> None:
    model = Path(shutil.copytree(src, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, f"model_type '{model_type}' is not supported", "llama", "a row in")
    assert not out.exists()


def test_remote_code_never_runs(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {
        "model_type": "custom",
        "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }
    (model / "config.json").write_text(json.dumps(config))
    result = griffin(*export_args(model, tmp_path / "out", *TEXT, "--trust-remote-code"))
    assert_refused(result, 1, "model_type 'custom' is not supported")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickle_weights_need_a_flag(src: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(src, tmp_path / "pickled"))
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, "pytorch_model.bin", "pickle", "--allow-pickle")
    assert not out.exists()


def test_truncated_safetensors_source(src: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(src, tmp_path / "truncated"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, str(weights), "truncated or corrupted", "re-download or re-convert")
    assert not out.exists()


def test_corrupted_safetensors_header(src: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(src, tmp_path / "corrupted"))
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"this is not json"
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, str(weights), "truncated or corrupted")
    assert not out.exists()


def test_source_missing_a_tensor_is_not_filled_with_random_values(
    src: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(src, tmp_path / "incomplete"))
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, "model.layers.1.mlp.up_proj.weight", "re-download or re-convert")
    assert not out.exists()


def test_source_missing_a_shard(src: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(model, max_shard_size="20KB")
    shutil.copy(src / "tokenizer.json", model)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    result = griffin(*export_args(model, out, *TEXT))
    assert_refused(result, 1, "missing 1 weight shard", shard.name, "re-download")
    assert not out.exists()


# -- option values ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5", "nan", "inf"])
def test_ratio_out_of_range(src: Path, tmp_path: Path, ratio: str) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, *TEXT, f"--ratio={ratio}"))
    assert_refused(result, 2, "--ratio must be a fraction in (0, 1]", "e.g. --ratio 0.5")
    assert not out.exists()


def test_ratio_not_a_number(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, *TEXT, "--ratio", "half"))
    # click's own usage error: exit 2, names the option and points at --help.
    assert result.exit_code == 2
    assert "Invalid value for '--ratio'" in result.output and "--help" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("multiple", ["0", "-64"])
def test_multiple_of_not_positive(src: Path, tmp_path: Path, multiple: str) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, *TEXT, f"--multiple-of={multiple}"))
    assert_refused(result, 2, f"--multiple-of must be a positive integer, got {multiple}", "64")
    assert not out.exists()


def test_bad_dtype_and_max_prompt_tokens(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = griffin(*export_args(src, out, *TEXT, "--dtype", "int3"))  # refused by the parser
    assert bad.exit_code == 2 and "Invalid value for '--dtype'" in bad.output
    assert "'int3'" in bad.output and "'bfloat16'" in bad.output
    result = griffin(*export_args(src, out, *TEXT, "--max-prompt-tokens", "0"))
    assert_refused(result, 2, "--max-prompt-tokens must be at least 1, got 0")
    assert not out.exists()


# -- prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_or_whitespace_prompt_text(src: Path, tmp_path: Path, text: str) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, "--prompt-text", text))
    assert_refused(result, 2, "--prompt-text is empty or whitespace")
    assert not out.exists()


def test_no_prompt_at_all(src: Path, tmp_path: Path) -> None:
    result = griffin(*export_args(src, tmp_path / "out"))
    assert_refused(result, 2, "no prompt given", "--prompt FILE")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"", ("is empty",)),
        (b" \n\n\t", ("is empty",)),
        (b"text\x00with NUL", ("looks binary", "UTF-8 text file")),
        (b"caf\xe9 latin-1", ("is not valid UTF-8 (byte 3)", "iconv")),
    ],
    ids=["empty", "whitespace", "binary", "latin-1"],
)
def test_bad_prompt_file(src: Path, tmp_path: Path, content: bytes, needles: tuple[str]) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(content)
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, "--prompt", str(prompt)))
    assert_refused(result, 2, str(prompt), *needles)
    assert not out.exists()


def test_missing_prompt_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, "--prompt", str(tmp_path / "nope.txt")))
    assert_refused(result, 2, "nope.txt' does not exist", "--prompt")
    result = griffin(*export_args(src, out, "--prompt", str(tmp_path)))
    assert_refused(result, 2, "is a directory", "text file")
    assert not out.exists()


def test_unreadable_prompt_file(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = tmp_path / "secret.txt"
    prompt.write_text("some text")
    prompt.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.name == "secret.txt":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / "out"
    result = griffin(*export_args(src, out, "--prompt", str(prompt)))
    assert_refused(result, 2, "secret.txt' cannot be read (Permission denied)", "permissions")
    assert not out.exists()


def test_prompt_longer_than_the_context_is_truncated_with_a_warning(
    src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    long_text = "Rain falls on the hills. " * 20  # 500 characters = tokens; context is 256
    result = griffin(*export_args(src, out, "--prompt-text", long_text, "--json"))
    assert result.exit_code == 0, result.output
    assert "prompt 1 has 500 tokens; truncated to 256 (the model's context length)" in (
        result.output
    )
    assert json.loads(result.stdout)["prompt_tokens"] == 256
    assert (out / "griffin.json").is_file()


# -- the output location ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside"])
@pytest.mark.parametrize("force", [False, True])
def test_out_in_the_source(src: Path, where: str, force: bool) -> None:
    before = tree_digest(src)
    out = src if where == "same" else src / "pruned"
    result = griffin(*export_args(src, out, *TEXT, *(["--force"] if force else [])))
    assert_refused(result, 1, "is inside the source model directory", "outside it")
    assert tree_digest(src) == before


def test_out_containing_the_source_is_refused_even_with_force(src: Path, tmp_path: Path) -> None:
    parent = tmp_path / "models"
    model = Path(shutil.copytree(src, parent / "src"))
    before = tree_digest(parent)
    result = griffin(*export_args(model, parent, *TEXT, "--force"))
    assert_refused(result, 1, "contains the source model directory", "delete the source")
    assert tree_digest(parent) == before


def test_existing_out(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = griffin(*export_args(src, out, *TEXT))
    assert_refused(result, 1, "already exists", "--force")
    result = griffin(*export_args(src, out, *TEXT, "--force"))
    assert_refused(result, 1, "not a griffin export", "--force only replaces an earlier export")
    assert tree_digest(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    file_out = tmp_path / "file"
    file_out.write_text("x")
    assert_refused(griffin(*export_args(src, file_out, *TEXT, "--force")), 1, "is a file")
    assert file_out.read_text() == "x"


def test_force_replaces_an_earlier_export(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert griffin(*export_args(src, out, *TEXT, "--ratio", "0.25")).exit_code == 0
    result = griffin(*export_args(src, out, *TEXT, "--ratio", "0.5", "--force"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "griffin.json").read_text())["k_per_layer"] == [18, 18, 18]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


# -- exports handed to verify (the runtime and ppl call the same check) ----------------------


def test_tampered_export_is_named_by_verify(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert griffin(*export_args(src, out, *TEXT)).exit_code == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = griffin("verify", str(out))
    assert result.exit_code == 1
    assert "problem: model.safetensors: sha256 differs from griffin.json" in result.output
    assert "Traceback" not in result.output


def test_verify_with_a_different_original(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert griffin(*export_args(src, out, *TEXT)).exit_code == 0
    other = save_tiny("llama", tmp_path / "other", seed=3)
    result = griffin("verify", str(out), "--original", str(other))
    assert result.exit_code == 1
    assert "is not the model the export was made from" in result.output
    missing = griffin("verify", str(out), "--original", str(tmp_path / "gone"))
    assert_refused(missing, 1, "gone' not found")


# -- --debug ---------------------------------------------------------------------------------


def test_debug_shows_the_traceback(src: Path, tmp_path: Path) -> None:
    result = griffin("--debug", *export_args(src, tmp_path / "out", *TEXT, "--ratio", "2"))
    assert result.exit_code == 2
    assert "Traceback" in result.output and "check_ratio" in result.output
    assert "error: --ratio must be a fraction" in result.output
    assert not os.environ.get("GRIFFIN_DEBUG")


# -- property-based: random prompt bytes and option values -----------------------------------

_BAD_RATIOS = ["", "abc", "0.5x", "half", "--"]


def _prompt_ok(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        return bool(data.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)),
    ratio=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.floats(min_value=0.0, max_value=1.5).map(repr),
        st.sampled_from(_BAD_RATIOS),
    ),
    multiple_of=st.integers(min_value=-5, max_value=300),
)
def test_random_prompts_and_options_never_crash_or_write(
    src: Path, tmp_path_factory: pytest.TempPathFactory, data: bytes, ratio: str, multiple_of: int
) -> None:
    """Whatever the bytes and values, griffin answers with one line and an exit code, and the
    existing --out is left as it was (no model loads: every run stops before loading)."""
    root = tmp_path_factory.mktemp("prop")
    prompt = root / "prompt.txt"
    prompt.write_bytes(data)
    out = root / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    args = ["--prompt", str(prompt), f"--ratio={ratio}", f"--multiple-of={multiple_of}"]
    result = griffin(*export_args(src, out, *args))

    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in root.iterdir()) == ["out", "prompt.txt"]
    assert tree_digest(out) == {"keep.txt": hashlib.sha256(b"keep").hexdigest()}
    try:
        value = float(ratio)
    except ValueError:
        assert result.exit_code == 2 and "Invalid value for '--ratio'" in result.output
        return
    if not _prompt_ok(data):
        assert_refused(result, 2, "prompt file", str(prompt))
    elif not 0 < value <= 1:
        assert_refused(result, 2, "--ratio must be a fraction in (0, 1]")
    elif multiple_of < 1:
        assert_refused(result, 2, "--multiple-of must be a positive integer")
    else:
        assert_refused(result, 1, "already exists", "--force")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_read_prompt_file_accepts_text_and_refuses_the_rest(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    prompt = tmp_path_factory.mktemp("read") / "p.txt"
    prompt.write_bytes(data)
    if _prompt_ok(data):
        assert read_prompt_file(str(prompt)) == data.decode("utf-8")
    else:
        with pytest.raises(UsageError, match="prompt file"):
            read_prompt_file(str(prompt))


# -- the library's public functions: GriffinError, never ValueError ----------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    """A tiny Llama (3 layers, d_ff 37) and its architecture spec."""
    model = tiny_model("llama")
    return spec_for("llama"), model


def _keep(k: int = 5, layers: int = 3) -> list[torch.Tensor]:
    return [torch.arange(k) for _ in range(layers)]


@pytest.mark.parametrize(
    ("keep", "needles"),
    [
        (_keep(layers=2), ["2 kept-index sets for a model of 3 layers", "one per layer"]),
        ([*_keep(layers=2), torch.arange(6)], ["one FF width in every layer", "[5, 6]"]),
        ([*_keep(layers=2), torch.tensor([0, 37])], ["layer 2", "outside 0..36", "max 37"]),
        ([*_keep(layers=2), torch.tensor([-1, 3])], ["layer 2", "outside 0..36", "min -1"]),
        ([torch.tensor([1, 1, 2]), *_keep(3, 2)], ["layer 0", "repeats a neuron"]),
        ([torch.zeros(0, dtype=torch.long), *_keep(0, 2)], ["layer 0", "is empty"]),
        ([torch.arange(5.0), *_keep(layers=2)], ["layer 0", "torch.float32", "1-D integer"]),
        ([torch.arange(6).view(2, 3), *_keep(6, 2)], ["layer 0", "shape (2, 3)"]),
    ],
)
def test_prune_model_refuses_bad_kept_indices(
    tiny_llama: Any, keep: list[torch.Tensor], needles: list[str]
) -> None:
    """prune_model (and prune_model_per_layer) with kept indices that cannot slice the model:
    one-line UsageError naming the layer and the value, and the model untouched. Catches the
    old ValueError, torch's IndexError from index_select, or a silently wrong model (a
    repeated neuron counted twice by the down projection)."""
    spec, model = tiny_llama
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(UsageError) as caught:
        prune_model(spec, model, keep)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    if "one FF width" not in message:  # per-layer widths are what prune_model_per_layer takes
        with pytest.raises(UsageError, match=re.escape(needles[0])):
            prune_model_per_layer(spec, model, keep)


@pytest.mark.parametrize("k", [0, -1, 8, 2.5, "3", None])
def test_top_k_indices_refuses_a_k_outside_the_scores(k: Any) -> None:
    """k outside 1..n or not an integer: UsageError naming k and the range. Catches the old
    ValueError, and a float k that slipped through to a TypeError in slicing."""
    with pytest.raises(UsageError, match=rf"k={re.escape(repr(k))} is not an integer in 1\.\.7"):
        top_k_indices(torch.rand(7), k)
    assert top_k_indices(torch.arange(7.0), torch.tensor(2)).tolist() == [5, 6]


@pytest.mark.parametrize(("n_layers", "d_ff", "name"), [(0, 37, "n_layers"), (3, 0, "d_ff")])
@pytest.mark.parametrize("budget", ["uniform", "protect"])
def test_layer_sizes_refuses_an_empty_model(
    budget: str, n_layers: int, d_ff: int, name: str
) -> None:
    """No layers or no FF neurons: UsageError naming the value. Catches protect's IndexError
    on zero layers and the [0, 0, 0] budget (layers keeping no neuron) for d_ff 0."""
    with pytest.raises(UsageError, match=f"{name} must be a positive integer, got 0"):
        layer_sizes(budget, n_layers, d_ff, 0.5)


def test_refit_math_refuses_mismatched_input() -> None:
    """The refit's public math with inputs that do not fit together: UsageError each, naming
    the shapes or the missing argument. Catches the old ValueErrors."""
    with pytest.raises(UsageError, match=r"the Gram matrix is \(4, 3\), not square"):
        regression(torch.rand(4, 3), torch.arange(2))
    with pytest.raises(UsageError, match="bias=True needs sums="):
        regression(torch.eye(4), torch.arange(2), bias=True)
    with pytest.raises(UsageError, match=r"Gram matrix \(4, 4\) does not match the down weight"):
        refit_down(torch.eye(4), torch.rand(6, 5), torch.arange(2))


def test_runtime_refresh_before_generate_is_refused(src: Path, tmp_path: Path) -> None:
    """GriffinRuntime.refresh() called directly, with no tokens seen: UsageError naming
    generate(refresh_every=N). Catches the IndexError of an empty ring list (or the
    RuntimeError of an empty ring)."""
    out = tmp_path / "export"
    export(str(src), ["Rain falls on the hills."], 0.5, out=out, compensate="none")
    runtime = GriffinRuntime.from_export(out, str(src))
    with pytest.raises(UsageError, match=r"call generate\(\.\.\., refresh_every=N\)"):
        runtime.refresh()


#: Raise sites of built-in exceptions that no caller can reach with bad input: each is caught
#: in the function that raises it, or by its caller and turned into a problem line or a
#: GriffinError (``read_json_object``, ``list_shards``), or guards an invariant of the streaming
#: writer or the refresh ring itself. Everything else raises a GriffinError subclass.
INTERNAL_RAISES = {
    ("storage/jsonfile.py", "read_json_object"),
    ("storage/safetensors_io.py", "list_shards"),
    ("storage/safetensors_io.py", "_write"),
    ("storage/safetensors_io.py", "close"),
    ("runtime/refresh.py", "contents"),
    ("runtime/refresh.py", "cached"),
}
_BUILTIN = ("ValueError", "TypeError", "RuntimeError", "KeyError")


def _own_nodes(function: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``function``'s body, not those of functions nested in it."""
    for child in ast.iter_child_nodes(function):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _own_nodes(child)


def _narrows_a_type(test: ast.expr) -> bool:
    """``assert isinstance(x, T)`` / ``assert x is not None``: for the type checker only."""
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name):
        return test.func.id == "isinstance"
    return isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.IsNot)


def test_the_library_raises_griffin_errors_only() -> None:
    """Every ``raise`` of ValueError, TypeError, RuntimeError or KeyError in griffin_export is
    one of the known internal sites (INTERNAL_RAISES), and no ``assert`` checks a value
    (assertions only narrow types for mypy). Catches a new public function that raises a bare
    ValueError where the README promises a GriffinError, or asserts on its input."""
    package = Path(griffin_export.__file__).parent
    found = set()
    for path in sorted(package.rglob("*.py")):
        where = str(path.relative_to(package))
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in _own_nodes(function):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    if isinstance(call, ast.Name) and call.id in _BUILTIN:
                        found.add((where, function.name))
                if isinstance(node, ast.Assert):
                    assert _narrows_a_type(node.test), f"{where}:{node.lineno} asserts a value"
    assert found <= INTERNAL_RAISES, sorted(found - INTERNAL_RAISES)


@pytest.mark.parametrize(
    "cause",
    [
        # what datasets 5 raises without network or with HF_HUB_OFFLINE=1 and an empty cache
        ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)"),
        TimeoutError("The read operation timed out"),
        LocalEntryNotFoundError("not in the local cache"),
    ],
)
def test_wikitext2_offline_is_one_line_advice(
    cause: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub unreachable: one ModelLoadError line with the cause and the offline corpora.
    Catches letting a connection error escape as a traceback."""
    monkeypatch.setattr(datasets, "load_dataset", _raising(cause))
    with pytest.raises(ModelLoadError) as caught:
        load_corpus("wikitext2")
    message = str(caught.value)
    assert "\n" not in message and str(cause) in message
    assert "offline, use --dataset wiki-summaries, shakespeare or a .txt file" in message


@pytest.mark.parametrize(
    "cause",
    [PermissionError(13, "Permission denied", "/cache/datasets"), ValueError("Unknown split")],
)
def test_wikitext2_other_failures_keep_their_cause(
    cause: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unwritable cache or a datasets bug is not "offline": it keeps its own type and
    message. Catches the old ``except Exception`` that called every failure offline."""
    monkeypatch.setattr(datasets, "load_dataset", _raising(cause))
    with pytest.raises(type(cause)) as caught:
        load_corpus("wikitext2")
    assert caught.value is cause


def _raising(exc: Exception) -> Any:
    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return load_dataset


def test_config_of_an_unknown_model_type_is_one_export_format_line(
    src: Path, tmp_path: Path
) -> None:
    """A config.json whose model_type transformers does not know: export_config (used by
    griffin gguf, opening exports and the quantizer) raises one ExportFormatError line naming
    the file and "re-export", and griffin gguf exits 1 with it. Catches transformers'
    bare ValueError escaping as a traceback."""
    from griffin_export.errors import ExportFormatError
    from griffin_export.formats.layout import export_config

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"model_type": "no-such-family"}))
    with pytest.raises(ExportFormatError) as caught:
        export_config(broken)
    message = str(caught.value)
    assert "\n" not in message and str(broken / "config.json") in message
    assert "re-export" in message
    done = griffin("gguf", str(broken), "--outtype", "f16")
    assert done.exit_code == 1 and "re-export" in done.output and "Traceback" not in done.output


def test_quantizer_prompt_with_a_broken_tokenizer_names_its_files(
    src: Path, tmp_path: Path
) -> None:
    """prompt_ids (griffin gguf --prompt) with a tokenizer file that does not parse: one
    ModelLoadError line naming the file, as every other command says it. Catches calling
    AutoTokenizer.from_pretrained directly (its own exception types escape)."""
    from griffin_export.engines.quantize import prompt_ids

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as caught:
        prompt_ids(broken, ["Rain falls."])
    message = str(caught.value)
    assert "\n" not in message and "tokenizer.json" in message


def test_a_model_without_tokenizer_files_is_the_same_line_everywhere(
    src: Path, tmp_path: Path
) -> None:
    """A model directory without tokenizer files: griffin export, griffin inspect --prompt,
    and the runtime's generate (an export whose tokenizer files are gone) all refuse it with
    the one line of require_tokenizer naming the directory. Catches a command with its own
    wording (the runtime's did not name the export) or one that reaches the tokenizer call
    with None (a TypeError)."""
    from types import SimpleNamespace

    from griffin_export.storage.sources import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    wanted = f"'{bare}' has no tokenizer files; add them to its directory"
    with pytest.raises(UsageError, match=re.escape(wanted)):
        export(str(bare), ["Rain falls."], 0.5, out=tmp_path / "e")
    prompt = tmp_path / "p.txt"
    prompt.write_text("Rain falls.")
    done = griffin("inspect", "--model", str(bare), "--prompt", str(prompt), "--json")
    assert done.exit_code == 2 and wanted in done.output
    runtime = SimpleNamespace(tokenizer=None, export=SimpleNamespace(directory=bare))
    with pytest.raises(UsageError, match=re.escape(wanted)):
        GriffinRuntime.generate(runtime, "Rain")  # type: ignore[arg-type]


def test_a_directory_without_config_is_the_same_usage_line_for_every_export_reader(
    tmp_path: Path,
) -> None:
    """load_pretrained and write_gguf (griffin gguf) given a directory without config.json:
    the same one-line UsageError (exit 2) naming it and what to pass. Catches the two
    readers' own checks drifting apart (they raised different error types)."""
    from griffin_export.engines.llamacpp import write_gguf
    from griffin_export.formats.layout import load_pretrained

    (tmp_path / "weights").mkdir()
    messages = []
    for read in (load_pretrained, lambda d: write_gguf(d, tmp_path / "m.gguf", "f16")):
        with pytest.raises(UsageError) as caught:
            read(tmp_path / "weights")
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert f"'{tmp_path / 'weights'}' is not an export directory (no config.json)" in messages[0]


@pytest.fixture
def reader_spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[Any]]:
    """(opened, closed): every SafetensorsReader that SafetensorsReader.open made, and every
    close() call's reader."""
    from griffin_export.storage.safetensors_io import SafetensorsReader

    opened: list[Any] = []
    closed: list[Any] = []
    open_, close = SafetensorsReader.open.__func__, SafetensorsReader.close  # type: ignore[attr-defined]

    def spy_open(cls: Any, directory: Any) -> Any:
        opened.append(open_(cls, directory))
        return opened[-1]

    def spy_close(self: Any) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(SafetensorsReader, "open", classmethod(spy_open))
    monkeypatch.setattr(SafetensorsReader, "close", spy_close)
    return opened, closed


def test_a_streamed_load_that_fails_closes_its_reader(
    src: Path, tmp_path: Path, reader_spy: tuple[list[Any], list[Any]]
) -> None:
    """load_streamed on a checkpoint that lacks a non-block tensor (the final norm): the
    ModelLoadError, and the reader it opened closed. Catches a reader (open shard files) left
    behind on the error path, as only the returned model closed it."""
    from griffin_export.build.streaming import load_streamed
    from griffin_export.storage.sources import SourceRef

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    source = SourceRef(str(broken), "directory", broken, str(broken))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight"):
        load_streamed(source, spec_for("llama"), "llama", None, "cpu", None)
    opened, closed = reader_spy
    assert opened and all(any(r is c for c in closed) for r in opened)


def test_opening_an_export_that_fails_closes_its_reader(
    src: Path,
    tmp_path: Path,
    reader_spy: tuple[list[Any], list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """open_export_with_original failing while it reads the export's tensors (an
    ExportFormatError from its config): every reader it opened is closed. Catches the
    reader.close() skipped by the raise."""
    from griffin_export.errors import ExportFormatError
    from griffin_export.formats import exports

    out = tmp_path / "e"
    export(str(src), ["Rain falls on the hills."], 0.5, out=out)

    def refuse(directory: Any) -> Any:
        raise ExportFormatError("refused")

    monkeypatch.setattr(exports, "export_config", refuse)
    opened, closed = reader_spy
    with pytest.raises(ExportFormatError, match="refused"):
        exports.open_export_with_original(out, None)
    assert opened and all(any(r is c for c in closed) for r in opened)


@pytest.mark.parametrize(
    ("option", "flag"),
    [({"gguf_timeout": 60.0}, "--timeout"), ({"gguf_imatrix": "none"}, "--imatrix")],
)
def test_gguf_options_without_gguf_are_refused_by_the_library(
    src: Path, tmp_path: Path, option: dict[str, Any], flag: str
) -> None:
    """export(gguf_timeout=...) or export(gguf_imatrix=...) without gguf: one UsageError line
    naming the option and --gguf, nothing written, as the CLI says it. Catches a check made
    only in the CLI (a library caller's option silently ignored)."""
    out = tmp_path / "e"
    with pytest.raises(UsageError, match=f"{flag} .*add --gguf TYPE or drop it"):
        export(str(src), ["Rain falls."], 0.5, out=out, **option)
    assert not out.exists()
    done = griffin(*export_args(src, out, *TEXT), flag, "60" if flag == "--timeout" else "none")
    assert done.exit_code == 2 and "add --gguf TYPE or drop it" in done.output
