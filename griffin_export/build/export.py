"""``griffin export``: prompt in, genuinely smaller checkpoint out.

load -> tokenize -> score (full model, hooks) -> slice in place -> write atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from griffin_export._version import __version__
from griffin_export.build.prompts import tokenize_prompts
from griffin_export.build.streaming import (
    NotStreamableError,
    load_streamed,
    plan_sizes,
    select_and_write,
)
from griffin_export.build.streaming_moe import (
    expert_tensors,
    plan_moe_bytes,
    select_and_write_moe,
)
from griffin_export.core.architectures import ArchSpec, spec_for
from griffin_export.core.budgets import DEFAULT_BUDGET, check_budget, layer_sizes
from griffin_export.core.compensation import DEFAULT_METHOD, Compensation, default_alpha
from griffin_export.core.moe import has_down_bias
from griffin_export.core.moe_selection import (
    DEFAULT_EXPERT_SCORE,
    MoeSelection,
    plan_moe_sizes,
    prune_moe_model,
    select_moe,
)
from griffin_export.core.scoring import STATISTIC_NAME, check_multiple_of, check_ratio
from griffin_export.core.selection import Selection, select_experts
from griffin_export.core.slicing import prune_model
from griffin_export.engines.llamacpp import (
    DEFAULT_TIMEOUT,
    GgufResult,
    check_llama_cpp_config,
    check_llama_cpp_family,
    check_per_layer_gguf,
    check_timeout,
    converter_dir,
)
from griffin_export.engines.quantize import (
    check_imatrix,
    is_quantized,
    needs_whole_blocks,
    write_gguf_typed,
)
from griffin_export.errors import OutputError, UsageError
from griffin_export.formats.decilm import check_decilm_export, decilm_config
from griffin_export.formats.layout import prune_model_per_layer, set_per_layer_sizes
from griffin_export.formats.manifest import (
    CHECKPOINT_FORMATS,
    DEFAULT_CHECKPOINT_FORMAT,
    EXPERTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    PromptInfo,
    SourceInfo,
    prompt_sha256,
    write_manifest,
)
from griffin_export.storage.atomic import atomic_directory
from griffin_export.storage.fingerprint import file_sha256, model_fingerprint
from griffin_export.storage.loading import (
    LoadedModel,
    check_source,
    copy_tokenizer_files,
    dtype_name,
    load_model,
    load_tokenizer,
    parse_dtype,
    read_model_type,
    state_dict_bytes,
)
from griffin_export.storage.safetensors_io import list_shards, parse_size, save_file
from griffin_export.storage.sources import resolve_source

__all__ = ["EXPERTS_FILE", "MANIFEST", "ExportResult", "Progress", "export", "write_export"]

#: progress callback: (stage, done, total). Stages: load, score, slice, write.
Progress = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """What an export wrote and what it saved."""

    out_dir: Path
    source: str
    model_type: str
    n_layers: int
    d_ff: int
    k_per_layer: list[int]
    ratio: float
    dtype: str
    prompt_tokens: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    file_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    budget: str = DEFAULT_BUDGET
    compensation: dict[str, Any] | None = None
    checkpoint_format: str = DEFAULT_CHECKPOINT_FORMAT
    #: the GGUF written inside the export (``gguf=``): :meth:`GgufResult.to_dict`.
    gguf: dict[str, Any] | None = None
    #: a mixture of experts' record (the manifest's ``moe``), ``None`` for dense models
    moe: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def default_out_dir(model: str, ratio: float, budget: str = DEFAULT_BUDGET) -> Path:
    """``<model name>-griffin-<ratio>`` in the current directory (``-<budget>`` appended
    for a budget other than uniform)."""
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    suffix = "" if budget == "uniform" else f"-{budget}"
    return Path(f"{stem}-griffin-{ratio:g}{suffix}")


def export(
    model: str,
    prompts: Sequence[str],
    ratio: float = 0.5,
    *,
    experts: float = 1.0,
    expert_score: str = DEFAULT_EXPERT_SCORE,
    out: str | Path | None = None,
    multiple_of: int | None = None,
    budget: str = DEFAULT_BUDGET,
    dtype: str | None = None,
    device: str = "cpu",
    max_prompt_tokens: int | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    streaming: bool | None = None,
    compensate: str = DEFAULT_METHOD,
    alpha: float | None = None,
    checkpoint_format: str = DEFAULT_CHECKPOINT_FORMAT,
    gguf: str | None = None,
    gguf_timeout: float | None = None,
    gguf_on_line: Callable[[str], None] | None = None,
    gguf_imatrix: str | Path | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export ``model`` pruned to the experts that ``prompts`` select.

    Args:
        model: local HF directory, ``.gguf`` file, hub id, or ``"smollm2-135m"``.
        prompts: one or more texts; the statistic pools all their tokens.
        ratio: fraction of FF neurons kept per layer, in (0, 1]; in a mixture of experts,
            of every routed expert, shared expert and dense layer.
        experts: fraction of the routed experts kept in every layer of a mixture of
            experts, in (0, 1] (:mod:`griffin_export.core.moe_selection`); 1.0 for dense
            models.
        expert_score: how experts are ranked (:data:`~griffin_export.core.moe_selection.
            EXPERT_SCORES`): ``reap`` (router-weighted output norm) or ``count``.
        out: output directory (default ``<model>-griffin-<ratio>``); written atomically.
        multiple_of: round the kept count to a multiple of this (never above d_ff); default
            1, or 256 with a ``gguf`` K or IQ type (llama.cpp quantizes rows in blocks of 256
            there; :func:`~griffin_export.engines.quantize.needs_whole_blocks`) when d_ff
            reaches 256, said in the warnings.
        budget: how the kept neurons spread over the layers
            (:data:`griffin_export.core.budgets.BUDGETS`): ``uniform`` (GRIFFIN: ``ratio * d_ff``
            in every layer; loads with stock ``from_pretrained``) or ``protect`` (first and
            last layers dense, the others share the rest of the same total; per-layer sizes,
            load with :func:`griffin_export.load_pretrained`).
        dtype: ``None``/"auto" keeps the source's; else float32, bfloat16 or float16.
        max_prompt_tokens: truncate each prompt to this many tokens.
        force: replace an existing ``out`` (the old one survives until the new is complete).
        streaming: hold one decoder block at a time (:mod:`griffin_export.build.streaming`;
            mixtures of experts: :mod:`~griffin_export.build.streaming_moe`); ``None`` streams
            whenever the source is a safetensors directory whose conversions by
            ``transformers`` the stream reproduces (else it loads in memory). The output is
            bit-identical either way.
        compensate: how the pruned layers are repaired
            (:data:`griffin_export.core.compensation.METHODS`): ``refit`` (default) refits the kept
            neurons' down-projection columns on the prompt in closed form (ridge ``alpha``)
            so the pruned layer reproduces the full one there; same shapes, stock-loadable;
            ``refit-bias`` also fits a down bias (families whose down projection has one);
            ``none`` writes the plain slices (the exports of griffin before compensation,
            bit for bit).
        alpha: ridge strength of the refit, relative to the kept neurons' mean energy
            (default :func:`~griffin_export.core.compensation.default_alpha` of ``ratio``: 1, or 10
            from keep 0.8 up).
        checkpoint_format: the layout of ``config.json`` (:data:`~griffin_export.formats.manifest.
            CHECKPOINT_FORMATS`): ``hf`` (the source family's own; per-layer widths under
            ``griffin.intermediate_sizes``) or ``decilm`` (DeciLM / Nemotron-NAS
            ``block_configs``, which vLLM and llama.cpp's converter read; Llama-graph families
            only, every width a multiple of 256; :mod:`griffin_export.formats.decilm`).
        gguf: also write the export as ``model-<gguf>.gguf`` inside it, through llama.cpp's
            converter and, for its quantizer's types, quantizer
            (:func:`griffin_export.engines.quantize.write_gguf_typed`); one of
            :data:`~griffin_export.engines.quantize.ALL_OUTTYPES`. Refused before the model
            loads when the converter (or, for a quantizer type, the binding) is missing, and
            before scoring when the budget's per-layer widths have no llama.cpp graph.
        gguf_imatrix: with a quantizer ``gguf`` type, its importance matrix: ``"prompt"``
            (default below q6_k: computed on the written export over the prompt's tokens),
            ``"none"``, or an imatrix file of llama.cpp's; recorded in the manifest.
        gguf_timeout, gguf_on_line: with ``gguf``, the converter's time limit in seconds and
            a callback for each line of its output (``timeout`` and ``on_line`` of
            :func:`~griffin_export.engines.llamacpp.write_gguf`; default its limit).
            ``gguf_timeout`` or ``gguf_imatrix`` without ``gguf`` is refused (UsageError).
        progress: optional ``(stage, done, total)`` callback.

    Returns:
        An :class:`ExportResult`. Raises :class:`~griffin_export.errors.GriffinError`
        subclasses for bad input; nothing is left under ``out`` on failure.
    """
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    check_ratio(ratio)
    check_ratio(experts, "--experts")
    # --gguf with a K/IQ type and no multiple_of: k in whole blocks of 256 (when d_ff allows)
    block = needs_whole_blocks(gguf) if gguf is not None and multiple_of is None else None
    multiple = 1 if multiple_of is None else multiple_of
    check_multiple_of(multiple)
    check_budget(budget)
    how = Compensation(compensate, default_alpha(ratio) if alpha is None else alpha)
    shard_bytes = parse_size(max_shard_size)
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise UsageError(
            f"--max-prompt-tokens must be at least 1, got {max_prompt_tokens}; omit it for no limit"
        )
    if gguf is None and gguf_timeout is not None:
        raise UsageError("--timeout limits the --gguf conversion; add --gguf TYPE or drop it")
    if gguf is None and gguf_imatrix is not None:
        raise UsageError("--imatrix calibrates the --gguf quantizer; add --gguf TYPE or drop it")
    gguf_timeout = DEFAULT_TIMEOUT if gguf_timeout is None else gguf_timeout
    if gguf is not None:
        check_imatrix(gguf, gguf_imatrix, have_prompt=True)  # and the binding for a quantizer
        check_timeout(gguf_timeout)
        converter_dir()  # missing converter: refused before anything loads
    texts = [p for p in prompts if p.strip()]
    if not texts:
        raise UsageError("the prompt is empty; pass --prompt FILE or --prompt-text TEXT with text")
    torch_dtype = parse_dtype(dtype)
    source = resolve_source(model, report)
    out_dir = Path(out) if out is not None else default_out_dir(source.name, ratio, budget)
    _check_out_dir(out_dir, source.directory, force)
    _check_format(checkpoint_format, source, budget, ratio, block or multiple)

    auto = streaming is None
    if streaming is None:
        streaming = bool(list_shards(source.directory).files)
    report("load", 0, 1)
    loaded: LoadedModel | None = None
    if streaming:
        model_type, spec = check_source(source, allow_pickle)
        tokenizer = load_tokenizer(source)
        try:
            loaded = _load_streamed(source, spec, model_type, torch_dtype, device, tokenizer)
        except NotStreamableError:
            if not auto:
                raise
    if loaded is None:  # not streamed, or not streamable: in memory
        loaded = load_model(source, torch_dtype, device, allow_pickle, trust_remote_code)
    report("load", 1, 1)
    ids, warnings = tokenize_prompts(loaded, texts, max_prompt_tokens)
    warnings = [*loaded.warnings, *warnings]
    moe_sizes = None
    if loaded.spec.moe is not None:
        if budget != DEFAULT_BUDGET:
            raise UsageError(
                f"--budget {budget} is for dense models; a mixture of experts keeps one width "
                "per kind of FF (one config field each): drop --budget"
            )
        moe_sizes = plan_moe_sizes(loaded.spec, loaded.model, 1.0, experts)
        d_ff = moe_sizes.width_total
    else:
        if experts != 1.0:
            raise UsageError(
                f"--experts {experts:g} keeps routed experts of a mixture of experts; "
                f"'{loaded.model_type}' is a dense model: drop --experts"
            )
        d_ff = loaded.spec.d_ff(loaded.model.config)
    if block is not None and d_ff >= block and ratio < 1:
        multiple = block
    how.check_model(_has_down_bias(loaded), loaded.model_type)
    ks = layer_sizes(budget, len(loaded.spec.blocks(loaded.model)), d_ff, ratio, multiple)
    if moe_sizes is not None:
        moe_sizes = plan_moe_sizes(loaded.spec, loaded.model, ratio, experts, multiple)
    if multiple == block:
        plain = layer_sizes(budget, len(ks), d_ff, ratio, 1)
        change = (
            f"k {plain[0]} -> {ks[0]} in every layer"
            if len(set(plain)) == len(set(ks)) == 1
            else f"{sum(plain)} -> {sum(ks)} FF neurons in all"
        )
        warnings.append(
            f"k rounded to a multiple of {block} for --gguf {gguf}: {change} (keep "
            f"{sum(ks) / (len(ks) * d_ff):.3f}; llama.cpp's K and IQ types quantize rows in "
            "blocks of 256); pass --multiple-of N to choose"
        )
    if gguf is not None:
        check_llama_cpp_family(loaded.model_type)
        check_llama_cpp_config(loaded.model.config)
        if len(set(ks)) > 1:
            check_per_layer_gguf(loaded.model.config, budget)

    def describe(selection: Selection | MoeSelection, fingerprint: str) -> Manifest:
        return Manifest(
            griffin_version=__version__,
            source=SourceInfo(
                model=source.name,
                kind=source.kind,
                # Where the runtime finds the full weights again (GGUF: the cached conversion).
                directory=str(source.directory.resolve()) if source.directory else None,
                model_type=loaded.model_type,
                fingerprint=fingerprint,
                d_ff=selection.d_ff,
            ),
            ratio=ratio,
            multiple_of=multiple,
            budget=budget,
            statistic=STATISTIC_NAME,
            k_per_layer=selection.k_per_layer,
            prompt=PromptInfo(
                prompt_sha256(texts), selection.tokens, len(texts), max_prompt_tokens
            ),
            dtype=dtype_name(loaded.model.dtype),
            compensation=how.record() if how.active else None,
            checkpoint_format=checkpoint_format,
            moe=selection.record() if isinstance(selection, MoeSelection) else None,
        )

    write_weights: Callable[[Path], tuple[Selection | MoeSelection, Manifest]]
    # Layer-major: every prompt passes layer l before any passes l + 1, so scoring advances
    # by layers (a count of prompts would sit at 0 until the last layer).
    report("score", 0, len(ks))
    streamed = loaded.streamed
    if streamed is not None:
        # Scoring and writing are one pass: each block is sliced and written as soon as its
        # experts are known (griffin_export.build.streaming).
        params_before, bytes_before = plan_sizes(streamed, None, d_ff)
        if moe_sizes is None:
            params_after, bytes_after = plan_sizes(streamed, ks, d_ff)
        else:
            params_after, bytes_after = plan_moe_bytes(streamed, moe_sizes)
        write_total = len(ks)

        def layer_done(layer: int) -> None:  # scored, then sliced and handed to the writer
            report("score", layer + 1, write_total)
            report("write", layer + 1, write_total)

        def write_weights(directory: Path) -> tuple[Selection | MoeSelection, Manifest]:
            if moe_sizes is not None:
                done = select_and_write_moe(
                    streamed,
                    ids,
                    moe_sizes,
                    directory,
                    shard_bytes,
                    on_layer=layer_done,
                    compensation=how,
                    expert_score=expert_score,
                )
            else:
                done = select_and_write(
                    streamed,
                    ids,
                    ks,
                    directory,
                    shard_bytes,
                    on_layer=layer_done,
                    compensation=how,
                )
            manifest = describe(done.selection, done.fingerprint)
            manifest.files = dict(done.sha256)
            return done.selection, manifest

    else:
        # Of the source: the refit below writes over the kept down columns as it goes.
        params_before, bytes_before = state_dict_bytes(loaded.model)
        fingerprint = model_fingerprint(loaded.spec, loaded.model)

        def scored(layer: int) -> None:
            report("score", layer + 1, len(ks))

        chosen: Selection | MoeSelection
        if moe_sizes is not None:
            chosen = select_moe(
                loaded.spec,
                loaded.model,
                ids,
                moe_sizes,
                compensation=how,
                expert_score=expert_score,
                on_layer=scored,
            )
            report("slice", 0, 1)
            prune_moe_model(loaded.spec, loaded.model, chosen)
        else:
            chosen = select_experts(
                loaded.spec, loaded.model, ids, k_per_layer=ks, compensation=how, on_layer=scored
            )
            report("slice", 0, 1)
            if len(set(ks)) == 1:
                prune_model(loaded.spec, loaded.model, chosen.keep)
            else:
                prune_model_per_layer(loaded.spec, loaded.model, chosen.keep)
        params_after, bytes_after = state_dict_bytes(loaded.model)
        report("slice", 1, 1)
        write_total = 1

        def write_weights(directory: Path) -> tuple[Selection | MoeSelection, Manifest]:
            loaded.model.save_pretrained(directory, max_shard_size=shard_bytes)
            return chosen, describe(chosen, fingerprint)

    report("write", 0, write_total)
    file_bytes, selection, manifest, written = write_export(
        out_dir,
        loaded,
        force,
        write_weights,
        gguf=gguf,
        gguf_timeout=gguf_timeout,
        gguf_on_line=gguf_on_line,
        gguf_imatrix=gguf_imatrix,
        gguf_prompt=(ids, texts) if gguf is not None and is_quantized(gguf) else None,
        progress=report,
    )
    report("write", write_total, write_total)
    if written is not None:
        warnings += written.warnings
    return ExportResult(
        out_dir=out_dir,
        source=source.name,
        model_type=loaded.model_type,
        n_layers=len(selection.k_per_layer),
        d_ff=selection.d_ff,
        k_per_layer=selection.k_per_layer,
        ratio=ratio,
        dtype=manifest.dtype,
        prompt_tokens=selection.tokens,
        params_before=params_before,
        params_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        file_bytes=file_bytes,
        seconds=time.perf_counter() - started,
        warnings=warnings,
        budget=budget,
        compensation=manifest.compensation,
        checkpoint_format=checkpoint_format,
        gguf=None
        if written is None
        else written.to_dict() | {"path": str(out_dir / written.path.name)},
        moe=manifest.moe,
    )


def _load_streamed(
    source: Any,
    spec: ArchSpec,
    model_type: str,
    dtype: Any,
    device: str,
    tokenizer: Any,
) -> LoadedModel:
    """:func:`~griffin_export.build.streaming.load_streamed`, and for a mixture of experts
    where every routed expert lies on disk (:func:`~griffin_export.build.streaming_moe.
    expert_tensors`); ``NotStreamableError`` (the reader closed) when it cannot stream."""
    streamed = load_streamed(source, spec, model_type, dtype, device, tokenizer)
    if spec.moe is not None:
        try:
            expert_tensors(streamed)
        except NotStreamableError:
            streamed.reader.close()
            raise
    return streamed.loaded


def _check_format(
    checkpoint_format: str, source: Any, budget: str, ratio: float, multiple_of: int
) -> None:
    """Refuse an unknown ``checkpoint_format``, and a ``decilm`` export the layout cannot
    state (:func:`~griffin_export.formats.decilm.check_decilm_export`), from the source's
    config alone (before any weights load)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UsageError(
            f"--format '{checkpoint_format}' is not known; use one of "
            f"{', '.join(CHECKPOINT_FORMATS)}"
        )
    if checkpoint_format == "decilm":
        from transformers import AutoConfig

        spec = spec_for(read_model_type(source))
        config = AutoConfig.from_pretrained(source.load_id, trust_remote_code=False)
        check_decilm_export(config, spec, budget, ratio, multiple_of)


def _has_down_bias(loaded: LoadedModel) -> bool:
    spec, model = loaded.spec, loaded.model
    if spec.moe is not None:
        return has_down_bias(spec, model)
    if loaded.streamed is not None:
        return spec.param_name(0, "down", "bias") in loaded.streamed.plan
    return isinstance(getattr(spec.down_module(spec.blocks(model)[0]), "bias", None), Tensor)


def write_export(
    out_dir: Path,
    loaded: LoadedModel,
    force: bool,
    write_weights: Callable[[Path], tuple[Selection | MoeSelection, Manifest]],
    *,
    gguf: str | None = None,
    gguf_timeout: float = DEFAULT_TIMEOUT,
    gguf_on_line: Callable[[str], None] | None = None,
    gguf_imatrix: str | Path | None = None,
    gguf_prompt: tuple[Sequence[Tensor], Sequence[str]] | None = None,
    progress: Progress | None = None,
) -> tuple[int, Selection | MoeSelection, Manifest, GgufResult | None]:
    """Write an export atomically: the pruned weights first (``write_weights(directory)``,
    which returns the selection and the manifest; it also sets the config's FF width), then
    config (per-layer sizes under ``griffin.intermediate_sizes`` when they differ, or the
    DeciLM layout when the manifest's ``checkpoint_format`` says so), generation config,
    tokenizer, experts map, card and manifest.
    config (per-layer sizes under ``griffin.intermediate_sizes`` when they differ), generation
    config, tokenizer, experts map, card, the GGUF of ``gguf`` type if asked, and manifest.

    Returns the bytes of the weight files written, the selection, the manifest and the GGUF
    written (``None`` without ``gguf``).
    """
    written = None
    model = loaded.model
    with atomic_directory(out_dir, force=force) as tmp:
        try:
            selection, manifest = write_weights(tmp)
            model.config.griffin = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
            if isinstance(selection, Selection):
                set_per_layer_sizes(loaded.spec, model.config, selection.k_per_layer)
            if manifest.checkpoint_format == "decilm":
                config = decilm_config(model.config.to_diff_dict(), selection.k_per_layer)
                text = json.dumps(config, indent=2, sort_keys=True) + "\n"
                (tmp / "config.json").write_text(text, encoding="utf-8")
            else:
                model.config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
            copy_tokenizer_files(loaded.source, loaded.tokenizer, tmp)
            save_file(
                selection.index_map(),
                tmp / EXPERTS_FILE,
                {"format": FORMAT_NAME, "d_ff": str(selection.d_ff)},
            )
            (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
            if gguf is not None:
                ids, texts = gguf_prompt or (None, ())
                written = write_gguf_typed(
                    tmp,
                    tmp / f"model-{gguf}.gguf",
                    gguf,
                    imatrix=gguf_imatrix,
                    calibration=ids,
                    prompts=texts,
                    progress=progress,
                    on_line=gguf_on_line,
                    timeout=gguf_timeout,
                )
                manifest.gguf = {"file": written.path.name, "outtype": gguf}
                if written.imatrix is not None:
                    manifest.gguf["imatrix"] = dict(written.imatrix)
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            known = manifest.files  # hashed while written (streaming shards)
            manifest.files = {p.name: known.get(p.name) or file_sha256(p) for p in files}
            write_manifest(tmp, manifest)
        except (OSError, SafetensorError) as exc:  # disk full, quota, file size limit...
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OutputError(
                f"writing the export to '{out_dir}' failed: {why}; "
                "free disk space or choose another --out (nothing was left behind)"
            ) from exc
        weight_bytes = sum(p.stat().st_size for p in list_shards(tmp).files)
    return weight_bytes, selection, manifest, written


def _check_out_dir(out_dir: Path, source_dir: Path | None, force: bool) -> None:
    """Refuse an ``--out`` that would overwrite the source or anything but an earlier export.

    Checked before the model loads, so a refused run writes nothing.
    """
    if source_dir is not None:
        src, dst = source_dir.resolve(), out_dir.resolve()
        if dst == src or src in dst.parents:
            raise OutputError(
                f"--out '{out_dir}' is inside the source model directory '{source_dir}'; "
                "choose a directory outside it"
            )
        if dst in src.parents:
            raise OutputError(
                f"--out '{out_dir}' contains the source model directory '{source_dir}'; "
                "replacing it would delete the source, so choose another --out"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out '{out_dir}' exists and is a file; choose another --out")
    if out_dir.exists() and not force:
        raise OutputError(f"'{out_dir}' already exists; pass --force to replace it or choose --out")
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise OutputError(
            f"--out '{out_dir}' is a non-empty directory that is not a griffin export; --force "
            "only replaces an earlier export, so choose another --out or empty it yourself"
        )


def model_card(manifest: Manifest) -> str:
    """A short README for the export: how it was made and how to load it."""
    source = manifest.source
    k = manifest.k_per_layer
    if len(set(k)) == 1:
        kept = (
            f"Every feed-forward layer keeps {k[0]} of its {source.d_ff}\n"
            f"neurons (ratio {manifest.ratio})"
        )
        load = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```"""
    else:
        kept = (
            f"The feed-forward layers keep {min(k)} to {max(k)} of their {source.d_ff}\n"
            f"neurons ({sum(k)} in all: `{manifest.budget}` budget, "
            f"ratio {manifest.ratio})"
        )
        load = """Each layer has its own feed-forward width (`griffin.intermediate_sizes` in
`config.json`), which stock `from_pretrained` refuses. Load it with griffin, which returns a
standard `transformers` model:

```python
import griffin_export
from transformers import AutoTokenizer

model = griffin_export.load_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```"""
    if manifest.checkpoint_format == "decilm":
        load = """`config.json` is in the DeciLM / Nemotron-NAS layout (`block_configs`, one
`ffn_mult` per layer), which vLLM's `DeciLMForCausalLM` and llama.cpp's `convert_hf_to_gguf.py`
read (vLLM reads the config through `transformers`, which needs a DeciLM config class: the
remote code NVIDIA's Nemotron-NAS checkpoints ship, not included here). `transformers` has no
DeciLM model class of its own; griffin loads it as a standard `transformers` model:

```python
import griffin_export
from transformers import AutoTokenizer

model = griffin_export.load_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```"""
    how = manifest.compensation
    refit = (
        ""
        if not how
        else (
            " The kept neurons' down-projection columns were then refitted on\n"
            f"the same prompt (ridge, alpha {how['alpha']:g}"
            + (", with a down bias" if how.get("bias") else "")
            + ") so the pruned layers reproduce the full ones there."
        )
    )
    return f"""# GRIFFIN export of `{source.model}`

This checkpoint was written by griffin
{manifest.griffin_version}. {kept}, the ones with the largest GRIFFIN statistic
({manifest.statistic}) over a prompt of {manifest.prompt.tokens} tokens
(sha256 `{manifest.prompt.sha256[:16]}...`).{refit} Everything else is the original's, in
{manifest.dtype}.

The experts were chosen for text like that prompt; quality on unrelated text is lower.

## Load it

{load}

`griffin_experts.safetensors` holds, per layer (`layer.<i>`), the original neuron index of
every kept neuron in the order of the rows of the weights. `griffin.json` is the manifest
(source fingerprint, ratio, k per layer, prompt hash, file hashes).
"""
