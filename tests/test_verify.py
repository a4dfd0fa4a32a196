"""`griffin verify` and the guards the runtime and `ppl` call: intact exports pass, every kind of
tampering is named, and an original that is not the source is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export
from griffin_export.build.reproduce import verify_with_prompt
from griffin_export.errors import OriginalMismatchError, VerificationError
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.formats.verify import (
    check_export_files,
    check_original,
    check_original_model,
    verify_export,
)
from griffin_export.storage.fingerprint import file_sha256

from tiny import save_tiny

runner = CliRunner()
PROMPT = "Rivers carry water from the hills to the sea; rain fills them again."


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sources and exports: llama (single file, and sharded), gpt2 (Conv1D, biases), phi3
    (fused gate_up), and a llama with other weights (a wrong original)."""
    root = tmp_path_factory.mktemp("verify")
    paths: dict[str, Path] = {}
    for model_type in ("llama", "gpt2", "phi3"):
        src = save_tiny(model_type, root / f"{model_type}-src")
        export(str(src), [PROMPT], 0.5, out=root / f"{model_type}-out")
        paths[model_type] = src
    export(str(paths["llama"]), [PROMPT], 0.5, out=root / "sharded", max_shard_size="8KB")
    paths["other"] = save_tiny("llama", root / "other-src", seed=1)
    paths["root"] = root
    return paths


def copy_export(made: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["root"] / name, tmp_path / name))


def cli(*args: str) -> tuple[int, list[str], str]:
    result = runner.invoke(app, ["verify", *args])
    assert "Traceback" not in result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    return result.exit_code, problems, result.output


def rewrite_manifest_hash(export_dir: Path, name: str) -> None:
    """What a careful tamperer does: update the manifest's hash of a modified file."""
    manifest = json.loads((export_dir / MANIFEST).read_text())
    manifest["files"][name] = file_sha256(export_dir / name)
    (export_dir / MANIFEST).write_text(json.dumps(manifest))


def tamper_tensor(
    export_dir: Path, key: str, change: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace tensor ``key`` of the export's model.safetensors by ``change(tensor)`` and forge
    the manifest's hash of the file (so only a check of the values can notice)."""
    weights = export_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rewrite_manifest_hash(export_dir, "model.safetensors")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_intact_export_verifies_against_its_original(
    made: dict[str, Path], model_type: str
) -> None:
    out = made["root"] / f"{model_type}-out"
    code, problems, output = cli(str(out), "--original", str(made[model_type]))
    assert code == 0, output
    assert problems == []
    assert "ok:" in output and "pruned tensors against the original" in output
    assert check_export_files(out)["k_per_layer"] == [18, 18, 18]
    check_original(out, made[model_type])


def test_sharded_export_verifies(made: dict[str, Path]) -> None:
    out = made["root"] / "sharded"
    assert len(list(out.glob("model-*.safetensors"))) > 3
    code, _, output = cli(str(out), "--original", str(made["llama"]))
    assert code == 0, output


def test_missing_shard_is_named(made: dict[str, Path], tmp_path: Path) -> None:
    out = copy_export(made, "sharded", tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    code, problems, _ = cli(str(out))
    assert code == 1
    assert f"problem: {shard.name}: listed in griffin.json but missing; re-export" in problems
    assert any(
        "weight shard listed in model.safetensors.index.json is missing" in p for p in problems
    )
    with pytest.raises(VerificationError, match=shard.name) as caught:
        check_export_files(out)
    assert "griffin verify" in str(caught.value)


def test_modified_tensor_is_named(made: dict[str, Path], tmp_path: Path) -> None:
    out = copy_export(made, "llama-out", tmp_path)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.1.mlp.up_proj.weight"  # (down is refitted by default: not a slice)
    tensors[key][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    code, problems, _ = cli(str(out))
    assert code == 1
    assert problems == [
        "problem: model.safetensors: sha256 differs from griffin.json (modified or corrupted); "
        "re-export"
    ]
    with pytest.raises(VerificationError, match=r"model\.safetensors: sha256 differs"):
        check_export_files(out)

    # Even with the manifest's hash forged, the original exposes the tensor itself.
    rewrite_manifest_hash(out, "model.safetensors")
    assert cli(str(out))[0] == 0
    code, problems, _ = cli(str(out), "--original", str(made["llama"]))
    assert code == 1
    assert problems == [
        f"problem: {key}: differs from the original sliced at the recorded indices "
        "(modified after export?); re-export"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.flip(0), "indices not sorted ascending"),
        (lambda t: torch.cat([t[:1], t[:-1]]), "duplicate indices"),
        (lambda t: torch.cat([t[:-1], torch.tensor([37], dtype=t.dtype)]), "outside 0..36"),
        (lambda t: t[:-1], "17 indices but k is 18"),
    ],
)
def test_bad_kept_index_map_is_named(
    made: dict[str, Path], tmp_path: Path, change, message: str
) -> None:
    out = copy_export(made, "llama-out", tmp_path)
    experts = load_file(str(out / EXPERTS_FILE))
    experts["layer.2"] = change(experts["layer.2"]).contiguous()
    save_file(experts, str(out / EXPERTS_FILE), metadata={"format": "griffin-export", "d_ff": "37"})
    rewrite_manifest_hash(out, EXPERTS_FILE)
    code, problems, _ = cli(str(out))
    assert code == 1
    assert len(problems) == 1
    assert problems[0].startswith(f"problem: {EXPERTS_FILE} layer.2: ")
    assert message in problems[0]
    # With --original, the comparison it cannot make is named, not skipped in silence.
    code, problems, _ = cli(str(out), "--original", str(made["llama"]))
    assert code == 1 and len(problems) == 2 and "not compared" in problems[1]


def test_shapes_are_checked_against_the_config(made: dict[str, Path], tmp_path: Path) -> None:
    out = copy_export(made, "gpt2-out", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["n_inner"] = 20
    (out / "config.json").write_text(json.dumps(config))
    rewrite_manifest_hash(out, "config.json")
    code, problems, _ = cli(str(out))
    assert code == 1
    assert problems == [
        "problem: config.json: n_inner is 20 but griffin.json keeps [18] neurons per layer; "
        "re-export"
    ]


def test_config_transformers_cannot_read_is_a_problem_not_a_skip(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """A config.json that passes the raw checks but that transformers refuses (4 heads become
    5, which do not divide hidden 32): the layer-count and hidden-size checks cannot run, and
    verify says so (why: the exception's first line; what to do), exit 1. Catches the old
    ``except Exception: return None, None`` that skipped both checks and still said ok."""
    out = copy_export(made, "llama-out", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["num_attention_heads"] = 5
    (out / "config.json").write_text(json.dumps(config))
    rewrite_manifest_hash(out, "config.json")
    report = verify_export(out)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.startswith("config.json: transformers cannot read it (")
    assert "layer count and hidden size were not checked" in problem
    assert problem.endswith("fix config.json or re-export") and "\n" not in problem
    code, problems, _ = cli(str(out))
    assert code == 1 and problems == [f"problem: {problem}"]
    with pytest.raises(VerificationError, match="transformers cannot read it"):
        check_export_files(out)


def test_config_without_the_ff_width_is_named(made: dict[str, Path], tmp_path: Path) -> None:
    """config.json without intermediate_size: the FF width cannot be compared with k, and
    the one problem says why. Catches reading the missing width as ``None`` and reporting a
    mismatch of ``None`` (or nothing)."""
    out = copy_export(made, "llama-out", tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["intermediate_size"]
    (out / "config.json").write_text(json.dumps(config))
    rewrite_manifest_hash(out, "config.json")
    problems = verify_export(out).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("config.json: the FF width could not be read (")
    assert "intermediate_size" in problems[0] and problems[0].endswith("; re-export")


@pytest.mark.parametrize("name", ["num_hidden_layers", "hidden_size"])
def test_a_size_the_config_lacks_is_a_problem_not_a_skip(
    made: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config whose layer count or hidden size is not an integer (a config class that maps
    neither): the check that needs it is named as not run. Catches returning ``None`` for the
    size and skipping its check in silence."""
    out = made["root"] / "llama-out"
    real = AutoConfig.from_pretrained(out)
    sizes = {"num_hidden_layers": real.num_hidden_layers, "hidden_size": real.hidden_size}
    config = SimpleNamespace(**{**sizes, name: None})
    monkeypatch.setattr("griffin_export.formats.verify.export_config", lambda _: config)
    problems = verify_export(out).problems
    assert problems == [
        f"config.json: {name} is None, not an integer, so "
        + (
            "the layer count against griffin.json"
            if name == "num_hidden_layers"
            else "the FF tensors' hidden dimension"
        )
        + " was not checked; re-export"
    ]


def test_tensors_the_original_check_would_skip_are_named(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """With --original, an FF bias deleted from the export (GPT-2's c_fc bias) and a tensor
    added to it that the original lacks are both problems. Catches ``continue`` on a key that
    only one side has (the export then verified although its model would differ)."""
    out = copy_export(made, "gpt2-out", tmp_path)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    bias = "transformer.h.1.mlp.c_fc.bias"
    del tensors[bias]
    tensors["transformer.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rewrite_manifest_hash(out, "model.safetensors")
    code, problems, _ = cli(str(out), "--original", str(made["gpt2"]))
    assert code == 1
    assert problems == [
        f"problem: {bias}: in the original but missing from the export",
        "problem: transformer.extra.weight: in the export but not in the original",
    ]


def test_added_file_and_missing_manifest(made: dict[str, Path], tmp_path: Path) -> None:
    out = copy_export(made, "llama-out", tmp_path)
    (out / "extra.safetensors").write_bytes(b"x")
    code, problems, _ = cli(str(out))
    assert code == 1
    assert problems == [
        "problem: extra.safetensors: not listed in griffin.json (added after the export); "
        "remove it or re-export"
    ]
    (out / MANIFEST).unlink()
    code, problems, _ = cli(str(out))
    assert code == 1 and len(problems) == 1 and "griffin.json: missing" in problems[0]
    code, problems, _ = cli(str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in problems[0]


def test_a_different_original_is_refused(made: dict[str, Path]) -> None:
    out = made["root"] / "llama-out"
    code, problems, _ = cli(str(out), "--original", str(made["other"]))
    assert code == 1
    assert len(problems) == 1
    assert "is not the model the export was made from" in problems[0]
    with pytest.raises(OriginalMismatchError, match="pass the original it was exported from"):
        check_original(out, made["other"])
    other = AutoModelForCausalLM.from_pretrained(made["other"])
    with pytest.raises(OriginalMismatchError):
        check_original_model(out, other)
    check_original_model(out, AutoModelForCausalLM.from_pretrained(made["llama"]))
    code, problems, _ = cli(str(out), "--original", str(made["gpt2"]))
    assert code == 1 and "is a 'gpt2' model" in problems[0]


def test_verify_report_as_json(made: dict[str, Path]) -> None:
    result = runner.invoke(app, ["verify", str(made["root"] / "phi3-out"), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert verify_export(made["root"] / "phi3-out", hash_files=False).ok


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_original_check_reads_only_samples_and_kept_rows(
    made: dict[str, Path], model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying against the original never loads a whole FF weight of the original (only
    the fingerprint's samples and the kept rows/column range), and still passes. Catches a
    verify that casts or reads whole original tensors (issue 13, item 8)."""
    from griffin_export.storage.safetensors_io import SafetensorsReader

    whole: list[str] = []
    real_get = SafetensorsReader.get
    original = made[model_type]

    def get(self: SafetensorsReader, key: str) -> torch.Tensor:
        from_original = any(path.parent == original for path in self.paths)
        if from_original and ".mlp." in key and key.endswith("weight"):
            whole.append(key)
        return real_get(self, key)

    monkeypatch.setattr(SafetensorsReader, "get", get)
    report = verify_export(made["root"] / f"{model_type}-out", original, hash_files=False)
    assert report.ok, report.problems
    assert "pruned tensors against the original" in report.checked
    assert whole == []


def test_fingerprint_of_a_dtype_changed_export(tmp_path: Path) -> None:
    """A float32 original exported as bfloat16 passes check_original: the samples are cast
    to the export's dtype before hashing, as the export hashed its cast tensors. Catches
    hashing the original's own dtype, or casting after converting to float32."""
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), [PROMPT], 0.5, out=out, dtype="bfloat16")
    check_original(out, src)
    report = verify_export(out, src, hash_files=False)
    assert report.ok, report.problems


# -- --prompt: recompute the export from its prompt ---------------------------------------------


def _prompt_file(tmp_path: Path, text: str = PROMPT) -> str:
    path = tmp_path / "prompt.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_prompt_recomputes_the_export_and_a_different_prompt_fails(
    made: dict[str, Path], model_type: str, tmp_path: Path
) -> None:
    """``--prompt`` with the export's own prompt passes (experts and refit recomputed with
    the original); another prompt fails with one line saying it is not the export's prompt.
    Catches a recomputation that disagrees with export's own (another dtype, Conv1D or
    fused gate_up laid out the wrong way), and a --prompt that is silently ignored."""
    out = made["root"] / f"{model_type}-out"
    src = str(made[model_type])
    code, problems, output = cli(str(out), "--original", src, "--prompt", _prompt_file(tmp_path))
    assert code == 0, output
    assert "experts and refit recomputed from the prompt" in output
    other = _prompt_file(tmp_path, "A different text about mountains and snow.")
    code, problems, _ = cli(str(out), "--original", src, "--prompt", other)
    assert code == 1
    assert problems == [
        "problem: prompt: not the prompt the export was made from (its sha256 differs from "
        "griffin.json's); pass the prompt file(s) given to griffin export, in the same order"
    ]


def test_prompt_catches_a_refitted_tensor_that_the_original_cannot(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """A refitted down projection changed by 0.1 % (the manifest's hash forged) passes
    ``--original``, which can check only its shape and finiteness, but not ``--prompt``,
    which names the tensor. Catches a prompt check that compares shapes or hashes only, or a
    tolerance loose enough to let a real change through."""
    out = copy_export(made, "llama-out", tmp_path)
    key = "model.layers.2.mlp.down_proj.weight"
    tamper_tensor(out, key, lambda t: t * 1.001)
    src = str(made["llama"])
    assert cli(str(out), "--original", src)[0] == 0
    report = verify_with_prompt(out, [PROMPT], src)
    assert len(report.problems) == 1 and report.problems[0].startswith(
        f"{key}: differs from the refit recomputed from the prompt"
    ), report.problems


def test_prompt_recomputes_with_the_manifests_alpha_and_checks_the_experts(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """A manifest whose alpha was edited makes every refitted layer disagree with the
    recomputation; a manifest whose prompt hash and token count were forged to another
    prompt's gets past the hash but not the experts that prompt selects. Catches a
    recomputation with the default alpha instead of the recorded one, and a prompt check that
    trusts the hash alone."""
    from griffin_export.formats.manifest import prompt_sha256

    from tiny import char_tokenizer

    out = copy_export(made, "llama-out", tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["compensation"]["alpha"] = 2.0
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_with_prompt(out, [PROMPT]).problems
    assert [p.split(":")[0] for p in problems] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)
    ], problems
    other = "Snow falls on the mountains, melts in spring and feeds the lakes below."
    manifest["compensation"]["alpha"] = 1.0
    manifest["prompt"]["sha256"] = prompt_sha256([other])
    manifest["prompt"]["tokens"] = len(char_tokenizer()(other)["input_ids"])
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_with_prompt(out, [other]).problems
    assert len(problems) == 1 and problems[0].startswith(f"{EXPERTS_FILE}: layers "), problems


def test_prompt_check_of_a_bfloat16_export(made: dict[str, Path], tmp_path: Path) -> None:
    """A bfloat16 export (refit computed in bfloat16 activations, stored in bfloat16) passes
    ``--prompt``; its refitted weights moved by one bfloat16 step at the layer's scale (far
    more than two ulps for most entries) fail. Catches a recomputation in float32 compared
    with bfloat16 storage (the dtype the manifest records ignored), and a tolerance that
    accepts any bfloat16-sized change."""
    out = tmp_path / "bf16"
    export(str(made["llama"]), [PROMPT], 0.5, out=out, dtype="bfloat16")
    assert verify_with_prompt(out, [PROMPT]).problems == []
    key = "model.layers.0.mlp.down_proj.weight"

    def one_step_up(t: torch.Tensor) -> torch.Tensor:
        step = float(t.float().abs().max()) * torch.finfo(torch.bfloat16).eps
        return (t.float() + step).to(torch.bfloat16)

    tamper_tensor(out, key, one_step_up)
    problems = verify_with_prompt(out, [PROMPT]).problems
    assert [p.split(":")[0] for p in problems] == [key], problems


def test_prompt_check_uses_the_recorded_truncation(made: dict[str, Path], tmp_path: Path) -> None:
    """An export made with --max-prompt-tokens 6 verifies from its prompt without the user
    repeating the flag (the manifest records it), and a different limit passed explicitly
    still wins and is reported. Catches recomputing from the whole prompt (the token count, and
    so the experts, differ) and ignoring an explicit value."""
    out = tmp_path / "short"
    export(str(made["llama"]), [PROMPT], 0.5, out=out, max_prompt_tokens=6)
    assert verify_with_prompt(out, [PROMPT]).problems == []
    problems = verify_with_prompt(out, [PROMPT], max_prompt_tokens=7).problems
    assert len(problems) == 1 and "7 tokens, but the export pooled 6" in problems[0], problems


@pytest.mark.slow
def test_prompt_check_on_the_embedded_model(tmp_path: Path) -> None:
    """The embedded SmolLM2's default export (refit from the 140-token example prompt: the
    statistics' rows path, a T x T solve) passes ``--prompt`` with its prompt and names the
    one layer whose refitted weights were nudged by 0.01 %. Catches a recomputation that only
    agrees on the tiny models' sizes (the Gram path) and a tolerance too loose for real
    weights."""
    prompt = (Path(__file__).parents[1] / "examples" / "prompt.txt").read_text(encoding="utf-8")
    out = tmp_path / "half"
    export("smollm2-135m", [prompt], 0.5, out=out)
    assert verify_with_prompt(out, [prompt]).problems == []
    key = "model.layers.7.mlp.down_proj.weight"
    tamper_tensor(out, key, lambda t: t * 1.0001)
    problems = verify_with_prompt(out, [prompt]).problems
    assert [p.split(":")[0] for p in problems] == [key], problems
