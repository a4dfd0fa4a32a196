"""Streaming export: the source model passes through memory one decoder block at a time.

The model is built as a weightless skeleton (``torch.device("meta")``) from its config, so
embeddings, positions, rotary tables, masks and every block's math are ``transformers``' own
modules for the architecture. Only the tensors outside the decoder blocks (embeddings, final
norm; not an untied head, which the forward never reaches) come from the source;
non-persistent buffers (rotary ``inv_freq``...) are initialised by the model's own
``initialize_weights``, exactly as ``from_pretrained`` does.

The prompt then runs through the model's ordinary forward. A pre-hook on every decoder block
reads that block's tensors from the source shards (plain file reads, converted to the model's
dtype as ``from_pretrained`` converts them), asks the kernel to read the next block ahead, and
a post-hook puts them back to ``meta``. On the last prompt, the down projection's pre-hook of
block ``l`` completes layer ``l``'s statistic, so its experts are chosen right there and the
block's tensors are handed to :class:`ShardWriter`, which slices the FF ones and appends them
to the output shards on a background thread while the next block computes. The embedding is a
memory map of the source (the forward touches only the prompt's rows) and is copied to the
output in pieces, like an untied head. The source is read once (once per prompt with several
prompts) and the output written once; peak memory is the block computing, the block read
ahead, the write queue (at most 16 tensors, i.e. up to about two more blocks' worth) and the
prompt's activations.

Selection uses the same functions as the in-memory path (``capture_down_inputs``,
``normalized_square_sum``, ``griffin_statistic``, ``top_k_indices``, ``slice_weight``), so the
result is bit-identical to it (``tests/test_streaming.py`` checks every architecture).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from .activations import _StopForward, capture_down_inputs
from .architectures import ArchSpec
from .checkpoint import (
    SAFETENSORS_DTYPES,
    LoadedModel,
    SourceRef,
    fingerprint_samples,
    samples_fingerprint,
)
from .errors import ModelLoadError, UsageError
from .scoring import griffin_statistic, keep_count, normalized_square_sum, top_k_indices
from .selection import Selection
from .slicing import slice_bias, slice_weight

INDEX_NAME = "model.safetensors.index.json"

_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


# -- reading the source -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunks:
    """A tensor handed to :class:`ShardWriter` as its raw bytes, produced piece by piece by
    ``read()`` only when the writer gets to it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], Iterator[memoryview]]


class SourceTensors:
    """The tensors of a safetensors checkpoint directory, read one at a time on demand.

    Reads use plain file I/O into a fresh tensor, not a memory map: the pages pass through the
    page cache but never count as the process's memory, so only the tensors asked for (and
    still referenced) do.
    """

    def __init__(self, directory: Path) -> None:
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            paths = [directory / name for name in sorted(set(weight_map.values()))]
        else:
            paths = sorted(directory.glob("*.safetensors"))
        self.paths = paths
        self.entries: dict[str, _Entry] = {}
        self._files: dict[Path, IO[bytes]] = {}
        self._lock = threading.Lock()  # reads come from the prefetch and writer threads too
        for path in paths:
            with path.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ModelLoadError(
                        f"'{path}' stores '{key}' as {info['dtype']}, which griffin cannot "
                        "stream; pass --in-memory"
                    )
                self.entries[key] = _Entry(
                    path, dtype, tuple(info["shape"]), base + begin, end - begin
                )

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str) -> Tensor:
        """The tensor ``key`` as stored (CPU, the file's dtype)."""
        entry = self.entries[key]
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            self._read_into(entry, key, memoryview(raw.numpy()), entry.offset)  # type: ignore[arg-type]
        return raw.view(entry.dtype).reshape(entry.shape)

    def chunks(self, key: str, chunk_bytes: int = 16 << 20) -> Chunks:
        """The bytes of ``key`` as :class:`Chunks`: read piece by piece into one reused
        buffer when written, so copying a large unchanged tensor (an embedding, a head)
        through costs ``chunk_bytes`` of memory, not the tensor."""
        entry = self.entries[key]

        def pieces() -> Iterator[memoryview]:
            buffer = memoryview(bytearray(min(chunk_bytes, entry.nbytes)))
            for start in range(0, entry.nbytes, chunk_bytes):
                n = min(chunk_bytes, entry.nbytes - start)
                self._read_into(entry, key, buffer[:n], entry.offset + start)
                yield buffer[:n]

        return Chunks(entry.shape, entry.dtype, pieces)

    def _read_into(self, entry: _Entry, key: str, view: memoryview, offset: int) -> None:
        handle = self._handle(entry.path)
        done = 0
        while done < len(view):
            n = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise ModelLoadError(
                    f"'{entry.path}' ends inside tensor '{key}'; the file is truncated: "
                    "re-download or re-convert the model"
                )
            done += n

    def read_ahead(self, keys: Sequence[str]) -> None:
        """Ask the kernel to start reading ``keys``' bytes into the page cache now
        (asynchronous; a no-op where ``posix_fadvise`` does not exist)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for key in keys:
            entry = self.entries[key]
            if entry.nbytes:
                with suppress(OSError):
                    advise(
                        self._handle(entry.path).fileno(),
                        entry.offset,
                        entry.nbytes,
                        os.POSIX_FADV_WILLNEED,
                    )

    def map(self, key: str) -> Tensor:
        """The tensor ``key`` as a read-only-in-effect view of a private memory map of its
        bytes: pages are read (and count as the process's memory) only where touched, e.g.
        the embedding rows of the prompt's tokens."""
        entry = self.entries[key]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        length = entry.offset + entry.nbytes - start
        # ACCESS_COPY: torch needs a writable buffer; nothing writes to it, and a write
        # would only ever touch private copies of the pages, never the file.
        mapped = mmap.mmap(
            self._handle(entry.path).fileno(), length, offset=start, access=mmap.ACCESS_COPY
        )
        flat = torch.frombuffer(
            mapped,  # the tensor keeps the map alive
            dtype=entry.dtype,
            count=entry.nbytes // entry.dtype.itemsize,
            offset=entry.offset - start,
        )
        return flat.reshape(entry.shape)

    def nbytes(self, key: str) -> int:
        return self.entries[key].nbytes

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def _handle(self, path: Path) -> IO[bytes]:
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = path.open("rb", buffering=0)
            return handle

    def first_float_dtype(self) -> torch.dtype | None:
        """dtype of the first floating-point tensor of the first file (``dtype="auto"`` when
        the config names none, as ``from_pretrained`` decides it)."""
        for entry in self.entries.values():
            if entry.path == self.paths[0] and entry.dtype.is_floating_point:
                return entry.dtype
        return None

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


# -- the skeleton -----------------------------------------------------------------------------


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
    reader: SourceTensors
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
    tensors in memory, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    assert source.directory is not None
    reader = SourceTensors(source.directory)
    config = AutoConfig.from_pretrained(source.load_id, trust_remote_code=False)
    if dtype is None:  # dtype="auto", as from_pretrained resolves it
        dtype = getattr(config, "dtype", None) or reader.first_float_dtype() or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    try:
        target = torch.device(device)
        if target.type != "cpu":
            torch.empty(0, device=target)
    except Exception as exc:
        raise UsageError(f"--device '{device}' is not usable here ({exc}); use cpu") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    with suppress(Exception):  # as from_pretrained: a missing generation_config.json is fine
        model.generation_config = GenerationConfig.from_pretrained(source.load_id)

    _init_buffers(model, target)
    checkpoint_key = _checkpoint_keys(model)
    plan = _plan(model, checkpoint_key)
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
    loaded = LoadedModel(model, tokenizer, spec, model_type, source)
    streamed = StreamedModel(loaded, reader, checkpoint_key, plan, target, mapped=mapped)
    loaded.streamed = streamed
    for layer in range(len(blocks)):
        for role in spec.roles():
            for kind in ("weight", "bias"):
                key = spec.param_name(layer, role, kind)
                if key in plan:
                    streamed.ff[key] = (layer, role, kind)
    return streamed


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


def _mappable(reader: SourceTensors, key: str, like: Tensor, device: torch.device) -> bool:
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


def _read_as(reader: SourceTensors, key: str, like: Tensor, device: torch.device) -> Tensor:
    """Source tensor ``key`` as the model holds it: floating tensors cast to the model's dtype
    (on the CPU, as ``from_pretrained`` casts), then moved to ``device``."""
    value = _checked_shape(key, reader.read(key), like)
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


def _checkpoint_keys(model: Any) -> dict[str, str]:
    """Internal state-dict name -> checkpoint key (``transformers``' own renames reverted,
    e.g. GPT-NeoX's ``embed_out``)."""
    from transformers.modeling_utils import revert_weight_conversion

    internal = {name: tensor for name, _, _, tensor in _tensors(model)}
    marked = {name: torch.empty(0, device="meta") for name in internal}
    ids = {id(t): name for name, t in marked.items()}
    reverted = revert_weight_conversion(model, dict(marked))
    mapping: dict[str, str] = {}
    for key, tensor in reverted.items():
        name = ids.get(id(tensor))
        if name is None:
            raise UsageError(
                f"'{key}' is a converted tensor that griffin cannot stream; pass --in-memory"
            )
        mapping[name] = key
    for name in internal:
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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Writes tensors into safetensors shards as they arrive, in a fixed key order.

    Shapes are known in advance, so every shard's header is written first and each tensor's
    bytes are appended as ``put`` receives it; tensors that arrive early wait (by reference)
    for their turn. Shards are cut like ``save_pretrained`` cuts them (``huggingface_hub``'s
    greedy split, same names, same index).

    Writing happens on a background thread, so the caller's next block computes meanwhile;
    at most ``max_queued`` tensors wait in the queue (``put`` blocks beyond that). A failed
    write is raised by the next ``put`` or by ``close``.
    """

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_size: int,
        total_parameters: int,
        max_queued: int = 16,
    ) -> None:
        from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

        self.directory = directory
        self.entries = {key: (shape, dtype) for key, shape, dtype in entries}
        sizes = {key: _numel(shape) * dtype.itemsize for key, shape, dtype in entries}
        split = split_state_dict_into_shards_factory(
            sizes,
            get_storage_size=lambda n: n,
            get_storage_id=lambda n: None,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        self.files = list(split.filename_to_tensors.items())
        self.order = [key for _, keys in self.files for key in keys]
        self.index: dict[str, Any] | None = None
        if split.is_sharded:
            self.index = {
                "metadata": {"total_parameters": total_parameters, **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
        self._next = 0
        self._file = -1
        self._handle: IO[bytes] | None = None
        self._pending: dict[str, Tensor | Chunks] = {}
        self.sha256: dict[str, str] = {}  # shard file name -> sha256 of its bytes, as written
        self._digest: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="griffin-write")
        self._queued: deque[Future[None]] = deque()
        self.max_queued = max_queued

    def put(self, key: str, tensor: Tensor) -> None:
        """Hand over the output tensor ``key``; it is written as soon as its turn comes."""
        self.put_lazy(key, lambda: tensor)

    def put_lazy(self, key: str, make: Callable[[], Tensor | Chunks]) -> None:
        """Like :meth:`put`, with the tensor made by ``make()`` on the writer's thread (e.g.
        slicing a block's FF weights), or streamed from :class:`Chunks` when its turn comes."""
        while self._queued and self._queued[0].done():
            self._queued.popleft().result()  # a failed write surfaces here, early
        self._queued.append(self._pool.submit(self._accept, key, make))
        while len(self._queued) > self.max_queued:
            self._queued.popleft().result()

    def _accept(self, key: str, make: Callable[[], Tensor | Chunks]) -> None:
        self._pending[key] = make()
        while self._next < len(self.order) and self.order[self._next] in self._pending:
            name = self.order[self._next]
            self._write(name, self._pending.pop(name))
            self._next += 1

    def _write(self, key: str, tensor: Tensor | Chunks) -> None:
        shape, dtype = self.entries[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{key}: planned {shape} {dtype}, got {tuple(tensor.shape)}")
        file_keys = self.files[self._file][1] if self._file >= 0 else []
        if self._handle is None or key not in file_keys:
            self._open_next()
        assert self._handle is not None
        if isinstance(tensor, Chunks):
            for piece in tensor.read():
                self._emit(piece)
            return
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._emit(data.view(torch.uint8).numpy().data)

    def _emit(self, data: bytes | memoryview) -> None:
        """Append to the open shard, hashing on the way (no second read for the manifest)."""
        assert self._handle is not None
        self._handle.write(data)
        self._digest.update(data)

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self.sha256[self.files[self._file][0]] = self._digest.hexdigest()

    def _open_next(self) -> None:
        self._finish_shard()
        self._file += 1
        name, keys = self.files[self._file]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            shape, dtype = self.entries[key]
            size = _numel(shape) * dtype.itemsize
            header[key] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        self._handle = (self.directory / name).open("wb")
        self._digest = hashlib.sha256()
        self._emit(struct.pack("<Q", len(encoded)))
        self._emit(encoded)

    def close(self) -> None:
        """Finish the last shard and write the index; every key must have been written."""
        while self._queued:
            self._queued.popleft().result()
        self._pool.shutdown(wait=True)
        self._finish_shard()
        if self._next != len(self.order):
            raise RuntimeError(f"export incomplete: '{self.order[self._next]}' was never written")
        if self.index is not None:
            text = json.dumps(self.index, indent=2, sort_keys=True) + "\n"
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Stop writing (queued tensors are dropped) and close the open shard; harmless after
        :meth:`close`."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queued.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# -- the streamed forward ---------------------------------------------------------------------


@dataclass
class StreamResult:
    """What :func:`select_and_write` produced."""

    selection: Selection
    fingerprint: str
    sha256: dict[str, str]  # weight shard file name -> sha256, hashed as written


@contextmanager
def _blocks_from_source(streamed: StreamedModel) -> Iterator[dict[int, list[tuple[str, Tensor]]]]:
    """While active, every decoder block loads its tensors from the source just before it
    runs and drops them after. Yields ``{layer: [(checkpoint key, tensor)]}`` of the blocks
    currently loaded.

    While block ``l`` computes, a background thread reads block ``l + 1`` (file reads
    release the GIL) and the kernel is asked to fetch block ``l + 2`` from disk
    (``posix_fadvise(WILLNEED)``): reading overlaps the forward for one more block in memory.
    """
    spec, model = streamed.spec, streamed.model
    blocks = spec.blocks(model)
    live: dict[int, list[tuple[str, Tensor]]] = {}
    placeholders: dict[int, list[tuple[nn.Module, str, Tensor]]] = {}
    ahead: dict[int, Future[list[Tensor]]] = {}
    handles = []
    reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="griffin-read")

    def slots(layer: int) -> list[tuple[nn.Module, str, Tensor, str]]:
        prefix = f"{spec.layers}.{layer}."
        return [
            (owner, attr, meta, streamed.checkpoint_key[prefix + name])
            for name, owner, attr, meta in _tensors(blocks[layer])
        ]

    def read(places: list[tuple[nn.Module, str, Tensor, str]]) -> list[Tensor]:
        return [_read_as(streamed.reader, key, meta, streamed.device) for *_, meta, key in places]

    def release(layer: int) -> None:
        for owner, attr, meta in placeholders.pop(layer, []):
            if attr in owner._parameters:
                owner._parameters[attr] = meta  # type: ignore[assignment]
            else:
                owner._buffers[attr] = meta
        live.pop(layer, None)

    def load(_module: nn.Module, _args: Any, layer: int) -> None:
        release(layer)
        places = slots(layer)
        pending = ahead.pop(layer, None)
        values = pending.result() if pending is not None else read(places)
        if layer + 1 < len(blocks):
            ahead[layer + 1] = reads.submit(read, slots(layer + 1))
        if layer + 2 < len(blocks):
            streamed.reader.read_ahead([key for *_, key in slots(layer + 2)])
        for (owner, attr, _, _), value in zip(places, values, strict=True):
            _assign(owner, attr, value)
        placeholders[layer] = [(owner, attr, meta) for owner, attr, meta, _ in places]
        live[layer] = [(key, value) for (*_, key), value in zip(places, values, strict=True)]

    for layer, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(lambda _m, _a, layer=layer: load(_m, _a, layer))
        )
        handles.append(block.register_forward_hook(lambda _m, _a, _o, layer=layer: release(layer)))
    try:
        yield live
    finally:
        for handle in handles:
            handle.remove()
        reads.shutdown(wait=True, cancel_futures=True)
        ahead.clear()
        for layer in list(placeholders):
            release(layer)


def _return_freed_blocks_to_the_os() -> None:
    """Make glibc serve every allocation over 4 MiB with its own ``mmap`` (the default
    threshold grows with each large free, up to 32 MiB, after which freed blocks' tensors stay
    in the heap). Streaming allocates and frees one block's tensors per layer; without this,
    freed blocks accumulate in the process's resident memory. Affects only where memory comes
    from, never values; a no-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):
        m_mmap_threshold = -3
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 4 << 20)


@torch.inference_mode()
def select_and_write(
    streamed: StreamedModel,
    prompts: Sequence[Tensor],
    ratio: float,
    multiple_of: int,
    directory: Path,
    max_shard_size: int,
    on_prompt: Callable[[int], None] | None = None,
    k_per_layer: Sequence[int] | None = None,
) -> StreamResult:
    """Run ``prompts`` through the streamed model, choose every layer's experts with the same
    statistic as :func:`~griffin_export.selection.select_experts`, and write the pruned
    weights into ``directory`` (sets the config's FF width to the largest layer's).
    ``k_per_layer`` (fixed before the forward) overrides ``keep_count(d_ff, ratio, ...)``."""
    spec, model = streamed.spec, streamed.model
    d_ff = spec.d_ff(model.config)
    prompts = [p for p in prompts if p.numel()]
    if not prompts:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    _return_freed_blocks_to_the_os()
    n_layers = len(spec.blocks(model))
    ks = list(k_per_layer or [keep_count(d_ff, ratio, multiple_of)] * n_layers)
    entries = [
        (key, output_shape(streamed, key, ks, d_ff), dtype)
        for key, (_, dtype) in streamed.plan.items()
    ]
    buffers = {streamed.checkpoint_key[n] for n, o, a, _ in _tensors(model) if a in o._buffers}
    params = sum(_numel(shape) for key, shape, _ in entries if key not in buffers)
    block_keys = {key for key in streamed.plan if key.startswith(spec.layers + ".")}
    inverse = {key: name for name, key in streamed.checkpoint_key.items()}
    deferred: list[str] = []  # still on meta (an untied head): read from the source at the end
    sums: list[Tensor] = [torch.zeros(0)] * n_layers
    keep: list[Tensor] = [torch.zeros(0, dtype=torch.long)] * n_layers
    scores: list[Tensor] = [torch.zeros(0)] * n_layers
    samples: dict[str, tuple[tuple[int, ...], Tensor]] = {}
    tokens = 0
    last = False
    writer = ShardWriter(directory, entries, max_shard_size, params)
    try:
        # Non-block tensors: already in memory; the writer holds them until their turn.
        for key in streamed.plan:
            if key not in block_keys:
                value = model.get_parameter_or_buffer(inverse[key])
                if value.device.type == "meta":
                    deferred.append(key)
                elif key in streamed.mapped:  # written from the source: the map stays untouched
                    writer.put_lazy(key, _from_source(streamed.reader, key, value))
                else:
                    writer.put(key, value)
        with ExitStack() as stack:
            live = stack.enter_context(_blocks_from_source(streamed))

            def sink(layer: int, z: Tensor) -> None:
                part = normalized_square_sum(z)
                current = sums[layer]
                sums[layer] = part if current.numel() == 0 else current + part
                if last:
                    scores[layer] = griffin_statistic(sums[layer], accumulated=True)
                    keep[layer] = top_k_indices(scores[layer], ks[layer])
                    for key, value in live[layer]:
                        writer.put_lazy(
                            key, partial(_pruned, streamed, key, value, keep[layer], d_ff, samples)
                        )
                if layer == n_layers - 1:
                    raise _StopForward

            stack.enter_context(capture_down_inputs(spec, model, sink))
            for i, ids in enumerate(prompts):
                last = i == len(prompts) - 1
                with suppress(_StopForward):
                    model(input_ids=ids.reshape(1, -1).to(streamed.device), use_cache=False)
                tokens += int(ids.numel())
                if on_prompt is not None:
                    on_prompt(i)
        for key in deferred:
            like = model.get_parameter_or_buffer(inverse[key])
            writer.put_lazy(key, _from_source(streamed.reader, key, like))
        writer.close()
    finally:
        writer.abort()
        streamed.reader.close()
    spec.set_d_ff(model.config, max(ks))
    fingerprint = samples_fingerprint(
        (key, shape, parts) for key, (shape, parts) in samples.items()
    )
    selection = Selection(keep=keep, scores=scores, d_ff=d_ff, tokens=tokens)
    return StreamResult(selection, fingerprint, dict(writer.sha256))


def _from_source(reader: SourceTensors, key: str, like: Tensor) -> Callable[[], Tensor | Chunks]:
    """What the writer needs to write source tensor ``key`` as the model holds it: its bytes
    copied through in pieces when no dtype conversion is needed, else the converted tensor."""
    _check_shape(key, reader.entries[key].shape, like)
    if reader.dtype(key) == like.dtype:
        return partial(reader.chunks, key)
    return partial(_read_as, reader, key, like, torch.device("cpu"))


def _pruned(
    streamed: StreamedModel,
    key: str,
    value: Tensor,
    keep: Tensor,
    d_ff: int,
    samples: dict[str, tuple[tuple[int, ...], Tensor]],
) -> Tensor:
    """The output tensor of block tensor ``key``: FF tensors sliced to ``keep`` (their
    full-width fingerprint samples recorded on the way), others unchanged."""
    if key not in streamed.ff:
        return value
    samples[key] = (tuple(value.shape), fingerprint_samples(value))
    _, role, kind = streamed.ff[key]
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
        count += _numel(out)
        size += _numel(out) * dtype.itemsize
    return count, size
