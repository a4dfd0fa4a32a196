"""Recompute an export from the prompt it was made from (``griffin verify --prompt``).

The file checks of :mod:`griffin_export.formats.verify` need no model; this one runs the
export's own pipeline again (tokenizing, selection, refit) on the original, in memory, and
compares the experts and refitted down projections with what the export holds. It lives with
the pipeline so that the export format never imports the code that writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from griffin_export.build.prompts import tokenize_prompts
from griffin_export.core.compensation import Compensation
from griffin_export.core.moe_selection import LayerChoice, MoeSizes, select_moe
from griffin_export.core.selection import select_experts
from griffin_export.errors import OriginalMismatchError
from griffin_export.formats.exports import load_original
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST, prompt_sha256
from griffin_export.formats.verify import VerifyReport, verify_export, weight_files
from griffin_export.formats.verify_moe import KeptLayer
from griffin_export.storage.loading import DTYPE_OPTIONS, LoadedModel
from griffin_export.storage.safetensors_io import SafetensorsReader


def verify_with_prompt(
    export_dir: str | Path,
    prompts: Sequence[str],
    original: str | Path | None = None,
    *,
    hash_files: bool = True,
    max_prompt_tokens: int | None = None,
) -> VerifyReport:
    """:func:`~griffin_export.formats.verify.verify_export`, then recompute the export from
    ``prompts`` (the texts given to ``griffin export``, in order; truncated to
    ``max_prompt_tokens``, by default the ``--max-prompt-tokens`` the manifest records) with
    the original (``original``, default the manifest's source): the prompt's sha256 against
    the manifest's, the experts the prompt selects against the kept-index map, and for a
    compensated export every refitted down projection (and bias) against the refit
    recomputed by export's own code, within :func:`refit_tolerance`. Skipped (and not listed
    as checked) when the file checks could not read the manifest, the kept-index map or the
    weights: those problems are reported."""
    report = verify_export(export_dir, original, hash_files=hash_files)
    if report.manifest is None or (report.keep is None and report.moe_keep is None):
        return report
    where = None if original is None else str(original)
    if max_prompt_tokens is None:
        max_prompt_tokens = report.manifest["prompt"].get("max_tokens")
    if report.moe_keep is not None:
        _check_moe_prompt(
            Path(export_dir),
            report.manifest,
            report.moe_keep,
            where,
            prompts,
            max_prompt_tokens,
            report.problems,
        )
        report.checked.append("experts and neurons recomputed from the prompt")
        return report
    if report.keep is None:
        return report
    files, _ = weight_files(Path(export_dir))
    with SafetensorsReader(files) as exported:
        _check_prompt(
            Path(export_dir),
            report.manifest,
            exported,
            report.keep,
            where,
            prompts,
            max_prompt_tokens,
            report.problems,
        )
    report.checked.append("experts and refit recomputed from the prompt")
    return report


def refit_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, scale_tol)``: a refitted down weight ``got`` (stored in ``dtype``) matches its
    recomputation ``want`` (float32, cast to ``dtype``) where ``|got - want| <= rtol * |want|
    + scale_tol * max|want|`` elementwise, the max over the layer: 2 units in the last place
    of ``dtype`` (a rounding flip) plus 1e-5 of the layer's scale (the float32 solve's
    rounding differs between BLAS builds and thread counts: 1.8e-7 measured between 1 and 2
    threads on the embedded model)."""
    return 2 * torch.finfo(dtype).eps, 1e-5


def _check_prompt(
    export_dir: Path,
    manifest: dict[str, Any],
    exported: SafetensorsReader,
    keep: list[Tensor],
    original: str | None,
    prompts: Sequence[str],
    max_prompt_tokens: int | None,
    problems: list[str],
) -> None:
    """Recompute what ``griffin export`` made from ``prompts`` (its own tokenizing,
    selection and refit code, in memory) and compare with the export."""
    tokenized = _tokenized_original(
        export_dir, manifest, original, prompts, max_prompt_tokens, problems
    )
    if tokenized is None:
        return
    loaded, ids = tokenized
    how = _recorded_compensation(manifest)
    spec, model = loaded.spec, loaded.model
    selection = select_experts(  # with compensation, refits the down weights in place
        spec, model, ids, k_per_layer=manifest["k_per_layer"], compensation=how
    )
    differ = [
        layer
        for layer, (want, got) in enumerate(zip(selection.keep, keep, strict=True))
        if not torch.equal(want, got.long())
    ]
    if differ:
        problems.append(
            f"{EXPERTS_FILE}: layers {_layer_list(differ)} keep other neurons than the prompt "
            "selects from the original; re-export"
        )
        return
    if how is None:
        return
    axis = spec.neuron_axis("down")
    dtype = DTYPE_OPTIONS[manifest["dtype"]]
    rtol, scale_tol = refit_tolerance(dtype)
    for layer, block in enumerate(spec.blocks(model)):
        down = spec.down_module(block)
        weight, bias = down.weight, getattr(down, "bias", None)
        assert isinstance(weight, Tensor)
        wanted = {spec.param_name(layer, "down"): weight.detach().index_select(axis, keep[layer])}
        if how.bias and isinstance(bias, Tensor):
            wanted[spec.param_name(layer, "down", "bias")] = bias.detach()
        for key, want in wanted.items():
            if key not in exported or exported.shape(key) != tuple(want.shape):
                continue  # reported by the shape checks
            got, want = exported.get(key).float(), want.to(dtype).float()
            scale = float(want.abs().max())
            excess = (got - want).abs() - rtol * want.abs()
            if not float(excess.max()) <= scale_tol * scale:
                problems.append(
                    f"{key}: differs from the refit recomputed from the prompt by up to "
                    f"{float((got - want).abs().max()):.3g} (allowed: 2 ulps of "
                    f"{manifest['dtype']} plus {scale_tol:g} x the layer's largest |weight| "
                    f"{scale:.3g}); re-export"
                )


def _tokenized_original(
    export_dir: Path,
    manifest: dict[str, Any],
    original: str | None,
    prompts: Sequence[str],
    max_prompt_tokens: int | None,
    problems: list[str],
) -> tuple[LoadedModel, list[Tensor]] | None:
    """The original (checked against the manifest's fingerprint) and ``prompts`` tokenized
    as the export tokenized them; ``None`` with the problem when the prompt or its token
    count is not the export's."""
    texts = [p for p in prompts if p.strip()]
    recorded = manifest["prompt"]
    if prompt_sha256(texts) != recorded["sha256"]:
        problems.append(
            f"prompt: not the prompt the export was made from (its sha256 differs from "
            f"{MANIFEST}'s); pass the prompt file(s) given to griffin export, in the same order"
        )
        return None
    try:
        loaded = load_original(export_dir, manifest, original)
    except OriginalMismatchError as exc:
        problems.append(f"prompt: cannot recompute the export: {exc}")
        return None
    ids, _ = tokenize_prompts(loaded, texts, max_prompt_tokens)
    tokens = sum(int(one.numel()) for one in ids)
    if tokens != recorded["tokens"]:
        problems.append(
            f"prompt: {tokens} tokens, but the export pooled {recorded['tokens']}; pass the "
            "--max-prompt-tokens it was exported with"
        )
        return None
    return loaded, ids


def _check_moe_prompt(
    export_dir: Path,
    manifest: dict[str, Any],
    kept: list[KeptLayer],
    original: str | None,
    prompts: Sequence[str],
    max_prompt_tokens: int | None,
    problems: list[str],
) -> None:
    """Recompute a mixture-of-experts export's choice from ``prompts`` with export's own
    selection (:func:`~griffin_export.core.moe_selection.select_moe`, the recorded sizes,
    expert score and refit) and compare every layer's kept experts, their neurons, the shared
    experts' and dense layers' neurons with the kept-index map. Refitted values are not
    recomputed: the indices are what the prompt decides, and ``--original`` checks every
    tensor that is not refitted."""
    tokenized = _tokenized_original(
        export_dir, manifest, original, prompts, max_prompt_tokens, problems
    )
    if tokenized is None:
        return
    loaded, ids = tokenized
    record = manifest["moe"]
    sizes = MoeSizes(**record["sizes"])
    how = _recorded_compensation(manifest)
    selection = select_moe(
        loaded.spec,
        loaded.model,
        ids,
        sizes,
        compensation=how,
        expert_score=str(record["expert_score"]),
    )
    for layer, (want, got) in enumerate(zip(selection.layers, kept, strict=True)):
        problems.extend(_moe_layer_differences(layer, want, got))


def _moe_layer_differences(layer: int, want: LayerChoice, got: KeptLayer) -> list[str]:
    """One line per entry of layer ``layer``'s kept-index map that the prompt does not give."""
    where = f"{EXPERTS_FILE} layer.{layer}"
    fix = "re-export (or pass the original and prompt it was made from)"
    if isinstance(want, Tensor) or isinstance(got, Tensor):
        if isinstance(want, Tensor) and isinstance(got, Tensor):
            if torch.equal(want, got):
                return []
            return [f"{where}: keeps other neurons than the prompt selects; {fix}"]
        return [f"{where}: the prompt makes this layer {_kind(want)} layer, not {_kind(got)}"]
    if not torch.equal(want.experts, got.experts):
        return [
            f"{where}.experts: keeps experts {got.experts.tolist()} but the prompt selects "
            f"{want.experts.tolist()} from the original; {fix}"
        ]
    found = [
        f"{where}.neurons: expert {expert} keeps other neurons than the prompt selects from "
        f"the original; {fix}"
        for expert, a, b in zip(want.experts.tolist(), want.neurons, got.neurons, strict=True)
        if not torch.equal(a, b)
    ]
    same_shared = (
        want.shared is None
        if got.shared is None
        else want.shared is not None and torch.equal(want.shared, got.shared)
    )
    if not same_shared:
        found.append(
            f"{where}.shared: keeps other shared-expert neurons than the prompt selects; {fix}"
        )
    return found


def _kind(choice: LayerChoice | KeptLayer) -> str:
    return "a dense" if isinstance(choice, Tensor) else "an MoE"


def _recorded_compensation(manifest: dict[str, Any]) -> Compensation | None:
    recorded_how = manifest.get("compensation")
    if not recorded_how:
        return None
    return Compensation(str(recorded_how["method"]), float(recorded_how["alpha"]))


def _layer_list(layers: list[int]) -> str:
    shown = ", ".join(str(layer) for layer in layers[:8])
    return shown + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
