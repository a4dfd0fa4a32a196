"""Streaming export: the source model passes through memory one decoder block at a time.

The model is built as a weightless skeleton (``torch.device("meta")``) from its config, so
embeddings, positions, rotary tables, masks and every block's math are ``transformers``' own
modules for the architecture. Only the tensors outside the decoder blocks (embeddings, final
norm; not an untied head, which the forward never reaches) come from the source;
non-persistent buffers (rotary ``inv_freq``...) are initialised by the model's own
``initialize_weights``, exactly as ``from_pretrained`` does.

The prompts then run through the model's ordinary forward, layer-major
(:func:`~griffin_export.core.activations.run_layer_major`: every prompt passes block ``l``
before any passes block ``l + 1``). A pre-hook on every decoder block reads that block's
tensors from the source shards when the first prompt reaches it (plain file reads, converted
to the model's dtype as ``from_pretrained`` converts them) and asks the kernel to read the next
block ahead; a post-hook puts them back to ``meta`` after the last prompt. When the last
prompt reaches block ``l``'s down projection, layer ``l``'s statistic is complete, so its
experts are chosen (and its down projection refitted) right there, its prompt activations
dropped, and the block's tensors handed to :class:`ShardWriter`, which slices the FF ones and
appends them to the output shards on a background thread while the next block computes. The
embedding is a memory map of the source (the forward touches only the prompt's rows) and is
copied to the output in pieces, like an untied head. The source is read once and the output
written once; peak memory is the block computing, the block read ahead, the write queue (at
most 16 tensors, i.e. up to about two more blocks' worth), the prompts' activations and one
layer's refit statistics, whatever the depth.

Selection is the in-memory path's own (:class:`~griffin_export.core.selection.LayerSelector`:
statistic, finite check, top-k, refit; ``slice_weight`` for the slices), so the result is
bit-identical to it (``tests/test_streaming.py`` checks every architecture). Mixtures of
experts stream through :mod:`griffin_export.build.streaming_moe`, which reads a block's routed
experts only as the prompts reach them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.activations import run_layer_major
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.compensation import Compensation, Refit, Regression, apply_stored
from griffin_export.core.moe import experts_of, is_moe_layer
from griffin_export.core.moe_selection import MoeSelection
from griffin_export.core.scoring import check_sizes
from griffin_export.core.selection import LayerSelector, Selection
from griffin_export.core.slicing import slice_bias, slice_weight
from griffin_export.errors import ModelLoadError, UsageError
from griffin_export.storage.fingerprint import fingerprint_samples, samples_fingerprint
from griffin_export.storage.loading import LoadedModel, device_for, load_generation_config
from griffin_export.storage.safetensors_io import Chunks, SafetensorsReader, ShardWriter
from griffin_export.storage.sources import SourceRef

# -- the skeleton -----------------------------------------------------------------------------


class NotStreamableError(UsageError):
    """The checkpoint loads through a conversion of ``transformers`` that the streaming export
    does not reproduce (a fused attention projection that loading splits); the in-memory
    path exports it."""


@dataclass
class StreamedModel:
    """A skeleton model whose decoder blocks live in the source files.

    Attributes:
        loaded: the skeleton (non-block tensors real, block tensors on ``meta``).
        reader: the source tensors.
        checkpoint_key: internal state-dict name -> the key the source (and the output) use.
        plan: output key -> (shape, dtype) in ``save_pretrained``'s order, tied weights once.
        device: where the forward runs.
        ff: FF tensor key -> (layer, role, "weight" or "bias").
        mapped: non-block tensors held as memory maps of the source (the embedding: the
            forward touches only its prompt rows).
    """

    loaded: LoadedModel
    reader: SafetensorsReader
    checkpoint_key: dict[str, str]
    plan: dict[str, tuple[tuple[int, ...], torch.dtype]]
    device: torch.device
    ff: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    mapped: set[str] = field(default_factory=set)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def spec(self) -> ArchSpec:
        return self.loaded.spec


def load_streamed(
    source: SourceRef,
    spec: ArchSpec,
    model_type: str,
    dtype: torch.dtype | None,
    device: str,
    tokenizer: Any,
) -> StreamedModel:
    """Build the skeleton of ``source`` (a safetensors directory) with only its non-block
    tensors in memory, on ``device``. The returned model owns the reader; on an error before
    it exists the reader is closed here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert source.directory is not None
    reader = SafetensorsReader.open(source.directory)
    try:
        config = AutoConfig.from_pretrained(source.load_id, trust_remote_code=False)
        if dtype is None:  # dtype="auto", as from_pretrained resolves it
            dtype = getattr(config, "dtype", None) or reader.first_float_dtype() or torch.float32
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        target = device_for(device)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        generation, warnings = load_generation_config(source.directory)
        if generation is not None:
            model.generation_config = generation

        _init_buffers(model, target)
        experts = routed_expert_names(spec, model)
        checkpoint_key = _checkpoint_keys(model, skip=experts)
        # A mixture of experts' routed experts are stored per expert by most families
        # (transformers fuses them when loading): the plan names the keys on disk.
        plan = reverted_plan(model) if experts else _plan(model, checkpoint_key)
        block_prefix = spec.layers + "."
        # The non-block tensors the forward needs stay in memory for the whole run. An untied
        # output head is not needed (the forward stops before it): it is read when written.
        head = model.get_output_embeddings()
        mapped: set[str] = set()
        for name, holder, attr, meta in _tensors(model):
            if name.startswith(block_prefix) or meta.device.type != "meta":
                continue
            if holder is head and attr == "weight":
                continue
            key = checkpoint_key[name]
            if key in reader:
                if _mappable(reader, key, meta, target):
                    mapped.add(key)
                    _assign(holder, attr, _checked_shape(key, reader.map(key), meta))
                else:
                    _assign(holder, attr, _read_as(reader, key, meta, target))
        model.tie_weights()
        still_meta = [
            name
            for name, holder, attr, meta in _tensors(model)
            if not name.startswith(block_prefix)
            and meta.device.type == "meta"
            and not (holder is head and attr == "weight")
        ]
        blocks = spec.blocks(model)
        missing = [checkpoint_key[name] for name in still_meta]
        missing += [key for key in plan if key not in reader and key not in missing]
        if missing:
            raise ModelLoadError(
                f"'{source.name}' lacks {len(missing)} tensor(s) its config needs (first: "
                f"'{missing[0]}'); the checkpoint is incomplete or does not match config.json: "
                "re-download or re-convert it"
            )
        loaded = LoadedModel(model, tokenizer, spec, model_type, source, warnings=warnings)
        streamed = StreamedModel(loaded, reader, checkpoint_key, plan, target, mapped=mapped)
        loaded.streamed = streamed
        for layer in range(len(blocks) if spec.moe is None else 0):
            for role in spec.roles():
                for kind in ("weight", "bias"):
                    key = spec.param_name(layer, role, kind)
                    if key in plan:
                        streamed.ff[key] = (layer, role, kind)
        return streamed
    except BaseException:
        reader.close()
        raise


def _tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(name, owner, attribute, tensor)`` of every parameter and persistent buffer, in
    state-dict order (tied parameters under every name)."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, param in owner._parameters.items():
            if param is not None:
                yield dot + attr, owner, attr, param
        for attr, buffer in owner._buffers.items():
            if buffer is not None and attr not in owner._non_persistent_buffers_set:
                yield dot + attr, owner, attr, buffer


def _assign(owner: nn.Module, attr: str, value: Tensor) -> None:
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


#: Non-block tensors at least this large are memory-mapped for the forward, not read.
MAP_AT_BYTES = 16 << 20


def _mappable(reader: SafetensorsReader, key: str, like: Tensor, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and reader.dtype(key) == like.dtype
        and reader.nbytes(key) >= MAP_AT_BYTES
    )


def _check_shape(key: str, shape: Sequence[int], like: Tensor) -> None:
    if tuple(shape) != tuple(like.shape):
        raise ModelLoadError(
            f"'{key}' has shape {tuple(shape)} in the source but the config needs "
            f"{tuple(like.shape)}; the checkpoint does not match config.json"
        )


def _checked_shape(key: str, value: Tensor, like: Tensor) -> Tensor:
    _check_shape(key, value.shape, like)
    return value


def _read_as(reader: SafetensorsReader, key: str, like: Tensor, device: torch.device) -> Tensor:
    """Source tensor ``key`` as the model holds it: floating tensors cast to the model's dtype
    (on the CPU, as ``from_pretrained`` casts), then moved to ``device``."""
    value = _checked_shape(key, reader.get(key), like)
    if value.is_floating_point() and value.dtype != like.dtype:
        value = value.to(like.dtype)
    return value.to(device)


def _init_buffers(model: Any, device: torch.device) -> None:
    """Give every non-persistent buffer (rotary ``inv_freq``, embedding scales...) its value
    the way ``from_pretrained`` does: an empty tensor on the device, then the model's own
    ``initialize_weights`` (parameters are still on ``meta``, so only buffers get values)."""
    for name, buffer in model.named_non_persistent_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = torch.empty_like(buffer, device=device)
    for module in model.modules():
        with suppress(AttributeError):
            del module._is_hf_initialized
    model.initialize_weights()


def routed_expert_names(spec: ArchSpec, model: Any) -> frozenset[str]:
    """Internal names of the routed experts' tensors of a mixture of experts (``transformers``
    fuses them from per-expert checkpoint tensors; :mod:`griffin_export.build.streaming_moe`
    reads them), empty for a dense model."""
    if spec.moe is None:
        return frozenset()
    names: set[str] = set()
    for layer, block in enumerate(spec.blocks(model)):
        if is_moe_layer(spec, block):
            prefix = f"{spec.layers}.{layer}.{block_path(block, experts_of(spec, block))}."
            names.update(prefix + name for name, *_ in _tensors(experts_of(spec, block)))
    return frozenset(names)


def block_path(block: nn.Module, module: nn.Module) -> str:
    """Dotted path of ``module`` inside ``block``."""
    return next(name for name, sub in block.named_modules() if sub is module)


def reverted_plan(model: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The keys ``save_pretrained`` writes for ``model``, in its order (tied weights once,
    ``transformers``' conversions reverted: per-expert tensors of a mixture of experts), with
    shapes and dtypes. Nothing is read or allocated (meta tensors)."""
    from transformers.modeling_utils import (
        remove_tied_weights_from_state_dict,
        revert_weight_conversion,
    )

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    marked = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in state.items()}
    reverted = revert_weight_conversion(model, marked)
    return {key: (tuple(t.shape), t.dtype) for key, t in reverted.items()}


def _checkpoint_keys(model: Any, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Internal state-dict name -> checkpoint key (``transformers``' own renames reverted,
    e.g. GPT-NeoX's ``embed_out``); the names in ``skip`` (routed experts, converted by
    :mod:`~griffin_export.build.streaming_moe`) are left out of the reverting."""
    from transformers.modeling_utils import revert_weight_conversion

    internal = {name: tensor for name, _, _, tensor in _tensors(model) if name not in skip}
    marked = {name: torch.empty(0, device="meta") for name in internal}
    ids = {id(t): name for name, t in marked.items()}
    reverted = revert_weight_conversion(model, dict(marked))
    mapping: dict[str, str] = {}
    for key, tensor in reverted.items():
        name = ids.get(id(tensor))
        if name is None:
            raise NotStreamableError(
                f"'{key}' is a converted tensor that griffin cannot stream; pass --in-memory"
            )
        mapping[name] = key
    for name in internal:
        mapping.setdefault(name, name)
    for name in skip:
        mapping.setdefault(name, name)
    return mapping


def _plan(
    model: Any, checkpoint_key: dict[str, str]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The keys ``save_pretrained`` writes, in its order (tied weights once), with shapes."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    return {checkpoint_key[name]: (tuple(t.shape), t.dtype) for name, t in state.items()}


# -- writing ----------------------------------------------------------------------------------


def output_shape(
    streamed: StreamedModel, key: str, k: int | Sequence[int], d_ff: int
) -> tuple[int, ...]:
    """Shape of ``key`` in the output: FF tensors lose ``d_ff - k`` neurons (fused gate/up:
    twice that) along their neuron axis; a down bias is unchanged. ``k`` is one width for
    every layer or a list of per-layer widths."""
    shape = list(streamed.plan[key][0])
    if key not in streamed.ff:
        return tuple(shape)
    layer, role, kind = streamed.ff[key]
    if kind == "bias" and role == "down":
        return tuple(shape)
    axis = 0 if kind == "bias" else streamed.spec.neuron_axis(role)
    shape[axis] = shape[axis] // d_ff * (k if isinstance(k, int) else k[layer])
    return tuple(shape)


# -- the streamed forward ---------------------------------------------------------------------


@dataclass
class StreamResult:
    """What :func:`select_and_write` produced."""

    selection: Selection | MoeSelection
    fingerprint: str
    sha256: dict[str, str]  # weight shard file name -> sha256, hashed as written


@contextmanager
def blocks_from_source(
    streamed: StreamedModel,
    passes: int = 1,
    lazy: frozenset[str] = frozenset(),
    started: Callable[[int], None] | None = None,
    finished: Callable[[int], None] | None = None,
) -> Iterator[dict[int, list[tuple[str, Tensor]]]]:
    """While active, every decoder block loads its tensors from the source just before it
    first runs and drops them after it has run ``passes`` times (once per prompt: the
    prompts pass each block one after the other, layer-major). Yields ``{layer: [(checkpoint
    key, tensor)]}`` of the blocks currently loaded.

    Tensors named in ``lazy`` (internal names: a mixture of experts' routed experts) are not
    read: they start as zeros, for the caller to fill as needed. ``started(layer)`` is called
    once a block is loaded, ``finished(layer)`` after its last run, before it is dropped.

    While block ``l`` computes, a background thread reads block ``l + 1`` (file reads
    release the GIL) and the kernel is asked to fetch block ``l + 2`` from disk
    (``posix_fadvise(WILLNEED)``): reading overlaps the forward for one more block in memory.
    """
    spec, model = streamed.spec, streamed.model
    blocks = spec.blocks(model)
    live: dict[int, list[tuple[str, Tensor]]] = {}
    placeholders: dict[int, list[tuple[nn.Module, str, Tensor]]] = {}
    ahead: dict[int, Future[list[Tensor]]] = {}
    runs = [0] * len(blocks)
    handles = []
    reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="griffin-read")

    def slots(layer: int) -> list[tuple[nn.Module, str, Tensor, str]]:
        prefix = f"{spec.layers}.{layer}."
        return [
            (owner, attr, meta, streamed.checkpoint_key[prefix + name])
            for name, owner, attr, meta in _tensors(blocks[layer])
        ]

    def read(places: list[tuple[nn.Module, str, Tensor, str]]) -> list[Tensor]:
        return [
            torch.zeros(meta.shape, dtype=meta.dtype, device=streamed.device)
            if key in lazy
            else _read_as(streamed.reader, key, meta, streamed.device)
            for *_, meta, key in places
        ]

    def release(layer: int) -> None:
        for owner, attr, meta in placeholders.pop(layer, []):
            if attr in owner._parameters:
                owner._parameters[attr] = meta  # type: ignore[assignment]
            else:
                owner._buffers[attr] = meta
        live.pop(layer, None)

    def load(_module: nn.Module, _args: Any, layer: int) -> None:
        if layer in live:
            return
        places = slots(layer)
        pending = ahead.pop(layer, None)
        values = pending.result() if pending is not None else read(places)
        if layer + 1 < len(blocks):
            ahead[layer + 1] = reads.submit(read, slots(layer + 1))
        if layer + 2 < len(blocks):
            streamed.reader.read_ahead([key for *_, key in slots(layer + 2) if key not in lazy])
        for (owner, attr, _, _), value in zip(places, values, strict=True):
            _assign(owner, attr, value)
        placeholders[layer] = [(owner, attr, meta) for owner, attr, meta, _ in places]
        live[layer] = [(key, value) for (*_, key), value in zip(places, values, strict=True)]
        if started is not None:
            started(layer)

    def ran(_module: nn.Module, _args: Any, _output: Any, layer: int) -> None:
        runs[layer] += 1
        if runs[layer] >= passes:
            if finished is not None:
                finished(layer)
            release(layer)

    for layer, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(lambda _m, _a, layer=layer: load(_m, _a, layer))
        )
        handles.append(block.register_forward_hook(partial(ran, layer=layer)))
    try:
        yield live
    finally:
        for handle in handles:
            handle.remove()
        reads.shutdown(wait=True, cancel_futures=True)
        ahead.clear()
        for layer in list(placeholders):
            release(layer)


@cache
def _libc() -> Any:
    """glibc, or ``None`` off Linux (or where it cannot be loaded)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_blocks_to_the_os() -> None:
    """Make glibc serve every allocation over 4 MiB with its own ``mmap`` (the default
    threshold grows with each large free, up to 32 MiB, after which freed blocks' tensors stay
    in the heap). Streaming allocates and frees one block's tensors per layer; without this,
    freed blocks accumulate in the process's resident memory. Affects only where memory comes
    from, never values; a no-op off glibc. Process-wide and never undone (glibc cannot report
    the old threshold): see :func:`select_and_write`."""
    libc = _libc()
    with suppress(AttributeError):
        m_mmap_threshold = -3
        if libc is not None:
            libc.mallopt(m_mmap_threshold, 4 << 20)


def _return_freed_memory_to_the_os() -> None:
    """glibc's ``malloc_trim(0)``: give the free pages inside the heap back to the OS. The
    per-layer work under the 4 MiB ``mmap`` threshold (a refit's prompt rows and products:
    tokens x d_ff floats) is freed in the heap between small allocations that outlive it
    (each layer's kept indices, scores, fingerprint samples), so without this the freed pages
    stay resident and peak memory grows by a few MB per layer (benchmarks/bench_streaming.py,
    depth part). Called once per layer; never changes values; a no-op off glibc."""
    libc = _libc()
    with suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


@torch.inference_mode()
def select_and_write(
    streamed: StreamedModel,
    prompts: Sequence[Tensor],
    k_per_layer: Sequence[int],
    directory: Path,
    max_shard_size: int,
    on_prompt: Callable[[int], None] | None = None,
    on_layer: Callable[[int], None] | None = None,
    compensation: Compensation | None = None,
) -> StreamResult:
    """Run ``prompts`` through the streamed model, keep layer ``l``'s ``k_per_layer[l]``
    neurons by the same statistic as :func:`~griffin_export.core.selection.select_experts`, and
    write the pruned weights into ``directory`` (sets the config's FF width to the largest
    layer's). ``on_prompt(i)`` is called after prompt ``i``; ``on_layer(l)`` when layer ``l``'s
    experts are chosen and its tensors handed to the writer (when the last prompt reaches
    it). With an active ``compensation`` each layer's down projection is refitted on the
    prompts' activations when its experts are chosen, as the in-memory path refits it.

    Side effect on the whole process (glibc only): ``mallopt(M_MMAP_THRESHOLD, 4 MiB)``
    (:func:`_return_freed_blocks_to_the_os`), so that freed blocks go back to the OS. It is
    left set when this returns: glibc has no getter for the old threshold, and setting any
    value also turns off glibc's dynamic threshold, so the previous state cannot be
    restored. Later allocations of 4 MiB and more in the process are ``mmap``-ed; values
    never change."""
    spec, model = streamed.spec, streamed.model
    d_ff = spec.d_ff(model.config)
    prompts = [p for p in prompts if p.numel()]
    if not prompts:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    _return_freed_blocks_to_the_os()
    n_layers = len(spec.blocks(model))
    ks = check_sizes(k_per_layer, n_layers, d_ff)
    entries = [
        (key, output_shape(streamed, key, ks, d_ff), dtype)
        for key, (_, dtype) in streamed.plan.items()
    ]
    buffers = {streamed.checkpoint_key[n] for n, o, a, _ in _tensors(model) if a in o._buffers}
    params = sum(math.prod(shape) for key, shape, _ in entries if key not in buffers)
    samples: dict[str, tuple[tuple[int, ...], Tensor]] = {}
    writer = ShardWriter(directory, entries, max_shard_size, params)
    try:
        deferred = put_non_block(streamed, writer)
        with blocks_from_source(streamed, passes=len(prompts)) as live:

            def chosen(layer: int, keep: Tensor, regression: Regression | None) -> None:
                refit = None
                if regression is not None:
                    down = next(
                        v for k, v in live[layer] if streamed.ff.get(k) == (layer, "down", "weight")
                    )
                    refit = _LazyRefit(regression, down, spec.transposed)
                for key, value in live[layer]:
                    writer.put_lazy(
                        key, partial(_pruned, streamed, key, value, keep, d_ff, samples, refit)
                    )
                _return_freed_memory_to_the_os()
                if on_layer is not None:
                    on_layer(layer)

            selector = LayerSelector(ks, len(prompts), model.dtype, chosen, compensation)
            tokens = run_layer_major(spec, model, prompts, selector.add, streamed.device, on_prompt)
        deferred()
        writer.close()
    finally:
        writer.abort()
        streamed.reader.close()
    spec.set_d_ff(model.config, max(ks))
    fingerprint = samples_fingerprint(
        (key, shape, parts) for key, (shape, parts) in samples.items()
    )
    return StreamResult(selector.selection(d_ff, tokens), fingerprint, dict(writer.sha256))


def put_non_block(streamed: StreamedModel, writer: ShardWriter) -> Callable[[], None]:
    """Hand the writer every tensor outside the decoder blocks that is in memory (the writer
    holds them until their turn); returns what puts the rest (still on ``meta``: an untied
    head, read from the source), to call after the blocks."""
    model = streamed.model
    block_prefix = streamed.spec.layers + "."
    inverse = {key: name for name, key in streamed.checkpoint_key.items()}
    deferred: list[str] = []
    for key in streamed.plan:
        if key.startswith(block_prefix):
            continue
        value = model.get_parameter_or_buffer(inverse[key])
        if value.device.type == "meta":
            deferred.append(key)
        elif key in streamed.mapped:  # written from the source: the map stays untouched
            writer.put_lazy(key, _from_source(streamed.reader, key, value))
        else:
            writer.put(key, value)

    def put_deferred() -> None:
        for key in deferred:
            like = model.get_parameter_or_buffer(inverse[key])
            writer.put_lazy(key, _from_source(streamed.reader, key, like))

    return put_deferred


def _from_source(
    reader: SafetensorsReader, key: str, like: Tensor
) -> Callable[[], Tensor | Chunks]:
    """What the writer needs to write source tensor ``key`` as the model holds it: its bytes
    copied through in pieces when no dtype conversion is needed, else the converted tensor."""
    _check_shape(key, reader.shape(key), like)
    if reader.dtype(key) == like.dtype:
        return partial(reader.chunks, key)
    return partial(_read_as, reader, key, like, torch.device("cpu"))


class _LazyRefit:
    """A layer's refitted down projection, computed when the writer first needs it (on its
    thread, just before writing it: the refitted weight is not held in the write queue) and
    kept for the down bias, which follows the weight."""

    def __init__(self, regression: Regression, weight: Tensor, transposed: bool) -> None:
        self.regression, self.weight, self.transposed = regression, weight, transposed

    @cached_property
    def refit(self) -> Refit:
        return apply_stored(self.regression, self.weight, self.transposed)


def _pruned(
    streamed: StreamedModel,
    key: str,
    value: Tensor,
    keep: Tensor,
    d_ff: int,
    samples: dict[str, tuple[tuple[int, ...], Tensor]],
    lazy: _LazyRefit | None = None,
) -> Tensor:
    """The output tensor of block tensor ``key``: FF tensors sliced to ``keep`` (their
    full-width fingerprint samples recorded on the way), the down projection refitted
    (``lazy``), others unchanged."""
    if key not in streamed.ff:
        return value
    samples[key] = (tuple(value.shape), fingerprint_samples(value))
    _, role, kind = streamed.ff[key]
    if lazy is not None and role == "down":
        refit = lazy.refit
        if kind == "weight":
            return refit.weight
        return value if refit.bias is None else value + refit.bias
    if kind == "weight":
        return slice_weight(streamed.spec, role, value, keep, d_ff)
    return slice_bias(role, value, keep, d_ff)


def plan_sizes(
    streamed: StreamedModel, k: int | Sequence[int] | None, d_ff: int
) -> tuple[int, int]:
    """(parameter count, bytes) of the planned output (``k`` one width or one per layer);
    ``k=None`` for the full source."""
    count = size = 0
    for key, (shape, dtype) in streamed.plan.items():
        out = shape if k is None else output_shape(streamed, key, k, d_ff)
        count += math.prod(out)
        size += math.prod(out) * dtype.itemsize
    return count, size
