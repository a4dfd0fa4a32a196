"""Safetensors checkpoints in and out: the one place that lists a checkpoint's shards, reads
headers and tensors (whole, in pieces, or row/column subsets) and writes shards.

Reading goes through ``safetensors.safe_open`` where a tensor (or a slice of one, with
``get_slice``) is all that is needed. The streaming export and the runtime also need where a
tensor's bytes lie in its file (plain ``preadv`` reads, page-cache hints, copying bytes
through unchanged, memory maps of one tensor), which ``safe_open`` does not expose: those come
from :func:`read_header`, the package's only header parser.

Writing: :func:`encode_header` is the package's only header writer. Tensors are laid out in
the order given (:func:`save_file`: sorted by name), metadata in insertion order, so two
writes of the same tensors give the same bytes (``safetensors.torch.save_file`` writes its
metadata in a random order). Shards are cut as ``save_pretrained`` cuts them
(``huggingface_hub.split_state_dict_into_shards_factory``: same greedy split, same
``model-0000i-of-0000n.safetensors`` names, same ``model.safetensors.index.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from griffin_export.errors import ModelLoadError, UsageError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


# -- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shards:
    """The weight files of a checkpoint directory.

    Attributes:
        files: the files present, sorted by name: the shards the index names, else
            ``model.safetensors`` (what ``from_pretrained`` reads); empty if neither.
        missing: file names the index lists that do not exist.
        index: the index file, when there is one.
    """

    files: list[Path]
    missing: list[str]
    index: Path | None


def list_shards(directory: str | Path) -> Shards:
    """The weight files of ``directory``. Raises ``ModelLoadError`` for an unreadable or
    malformed index (callers that report rather than raise catch it)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) and Path(n).name == n for n in names):
                raise ValueError("weight_map names a path that is not a file name")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(
                f"'{index}' is unreadable or malformed ({_first_line(e)}); re-download, "
                "re-convert or re-export the model"
            ) from e
        missing = [n for n in names if not (directory / n).is_file()]
        files = [directory / n for n in names if n not in missing]
        return Shards(files, missing, index)
    single = directory / SINGLE_NAME
    return Shards([single] if single.is_file() else [], [], None)


# -- headers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: file, dtype, shape, absolute byte offset and length."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of one safetensors file and the offset where its tensor data starts."""
    with Path(path).open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20 or length + 8 > os.fstat(handle.fileno()).st_size:
            raise ModelLoadError(f"'{path}' has a corrupt safetensors header; re-write the file")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ModelLoadError(f"'{path}' has an unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"'{path}' has a safetensors header that is not a JSON object")
    return header, 8 + length


def entries(paths: Iterable[Path]) -> dict[str, Entry]:
    """Every tensor of ``paths`` by key, from their headers (no tensor data is read)."""
    found: dict[str, Entry] = {}
    for path in paths:
        header, base = read_header(path)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelLoadError(
                    f"'{path}' stores '{key}' as {info['dtype']}, which griffin does not read; "
                    "convert the checkpoint to a float dtype"
                )
            begin, end = info["data_offsets"]
            found[key] = Entry(path, dtype, tuple(info["shape"]), base + begin, end - begin)
    return found


def payload_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file (file size minus its header)."""
    _, base = read_header(path)
    return Path(path).stat().st_size - base


# -- reading through safe_open ---------------------------------------------------------------


class LazyTensors:
    """Checkpoint key -> tensor over safetensors files, opened with ``safe_open`` (memory
    mapped; nothing is read until asked). Use as a context manager, or call :meth:`close`."""

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self._files: dict[Path, Any] = {}
        try:
            for path in files:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                self._files[Path(path)] = handle
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    self._handles[key] = handle
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def open(cls, directory: str | Path) -> LazyTensors:
        """The tensors of a checkpoint directory (its shards, :func:`list_shards`)."""
        return cls(list_shards(directory).files)

    def __enter__(self) -> LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self._handles

    def metadata(self, path: Path) -> dict[str, str]:
        """The ``__metadata__`` of one of the files (empty if it has none)."""
        return dict(self._files[Path(path)].metadata() or {})

    def keys(self) -> list[str]:
        return list(self._handles)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[key].get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name (``"BF16"``...)."""
        return str(self._handles[key].get_slice(key).get_dtype())

    def get(self, key: str) -> Tensor:
        """The whole tensor (CPU, the file's dtype)."""
        tensor: Tensor = self._handles[key].get_tensor(key)
        return tensor

    def flat(self, key: str, start: int, stop: int) -> Tensor:
        """Elements ``start:stop`` of the tensor flattened (only those are read)."""
        shape = self.shape(key)
        if not shape:
            return self.get(key).reshape(-1)[start:stop]
        inner = 1
        for n in shape[1:]:
            inner *= n
        first, last = start // max(inner, 1), -(-stop // max(inner, 1))
        rows = self._handles[key].get_slice(key)[first:last]
        return rows.reshape(-1)[start - first * inner : stop - first * inner]

    def select(self, key: str, index: Tensor, axis: int) -> Tensor:
        """``tensor.index_select(axis, index)`` reading only the rows (``axis=0``) or the
        column range spanned by ``index`` (``axis=1``), not the whole tensor."""
        if index.numel() == 0:
            shape = list(self.shape(key))
            shape[axis] = 0
            return torch.empty(shape, dtype=DTYPES[self.dtype_name(key)])
        lo, hi = int(index.min()), int(index.max()) + 1
        part = self._handles[key].get_slice(key)
        block: Tensor = part[lo:hi] if axis == 0 else part[:, lo:hi]
        return block.index_select(axis, index.long() - lo)


def load_state(files: Iterable[Path]) -> dict[str, Tensor]:
    """Every tensor of ``files`` (a checkpoint's shards), loaded into memory."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


# -- reading by byte offset --------------------------------------------------------------


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
    still referenced) do. Thread-safe (the streaming export reads on two threads).
    """

    def __init__(self, directory: Path) -> None:
        self.paths = list_shards(directory).files
        self.entries = entries(self.paths)
        self._files: dict[Path, IO[bytes]] = {}
        self._lock = threading.Lock()

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

    def _read_into(self, entry: Entry, key: str, view: memoryview, offset: int) -> None:
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
                with contextlib.suppress(OSError):
                    advise(
                        self._handle(entry.path).fileno(),
                        entry.offset,
                        entry.nbytes,
                        os.POSIX_FADV_WILLNEED,
                    )

    def map(self, key: str) -> Tensor:
        """The tensor ``key`` as a view of a private memory map of its bytes: pages are read
        (and count as the process's memory) only where touched, e.g. the embedding rows of
        the prompt's tokens."""
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


class MappedSafetensors:
    """Tensors of a safetensors checkpoint as zero-copy views of memory-mapped files.

    Pages are read from disk only when touched, and belong to the page cache (shared,
    reclaimable), not to the process's own memory.
    """

    def __init__(self, directory: Path) -> None:
        paths = list_shards(directory).files
        if not paths:
            raise ModelLoadError(f"the original '{directory}' has no *.safetensors weights")
        self._where = entries(paths)
        self._maps: dict[Path, mmap.mmap] = {}
        for path in paths:
            with path.open("rb") as handle:
                # ACCESS_COPY: private copy-on-write pages, so torch gets a writable buffer
                # without ever writing the file (nothing here writes to them).
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Tensor:
        entry = self._where[key]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(
            self._maps[entry.path],
            dtype=entry.dtype,
            count=entry.nbytes // entry.dtype.itemsize,
            offset=entry.offset,
        )
        return flat.reshape(entry.shape)

    @property
    def mapped_bytes(self) -> int:
        return sum(len(m) for m in self._maps.values())


# -- writing ------------------------------------------------------------------------------------


def encode_header(
    layout: Iterable[tuple[str, torch.dtype, Sequence[int]]], metadata: dict[str, str]
) -> bytes:
    """The first bytes of a safetensors file holding ``layout`` (``(key, dtype, shape)``)
    packed in that order: the 8-byte length and the JSON header, padded with spaces so that
    tensor data starts 8-byte aligned (as safetensors pads it)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in layout:
        size = _numel(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": [int(n) for n in shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: tensors sorted by name,
    metadata in insertion order, so the bytes depend only on the contents."""
    ordered = [(key, tensors[key].detach().cpu().contiguous()) for key in sorted(tensors)]
    with Path(path).open("wb") as handle:
        handle.write(encode_header(((k, t.dtype, t.shape) for k, t in ordered), metadata))
        for _, tensor in ordered:
            if tensor.numel():
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1000`` (as ``save_pretrained`` reads
    ``max_shard_size``: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise UsageError(f"--max-shard-size must be positive, got {size}; e.g. 5GB")
        return size
    match = _SIZE.match(str(size))
    unit = (match.group(2) or "B").upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UsageError(
            f"--max-shard-size '{size}' is not a size; use e.g. 5GB, 500MB, 2GiB or a byte count"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class ShardPlan:
    """How ``save_pretrained`` would cut tensors of these sizes into shards."""

    files: list[tuple[str, list[str]]]  # file name -> its keys, in order
    weight_map: dict[str, str]
    metadata: dict[str, Any]

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> ShardPlan:
    """Cut tensors of ``sizes`` bytes (in write order) into shards of at most
    ``max_shard_size`` bytes as ``save_pretrained`` does (``huggingface_hub``'s greedy
    split, ``model-0000i-of-0000n.safetensors``)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda n: n,
        get_storage_id=lambda n: None,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    files = [(name, list(keys)) for name, keys in split.filename_to_tensors.items()]
    return ShardPlan(files, dict(split.tensor_to_filename), dict(split.metadata))


def index_text(plan: ShardPlan, total_parameters: int) -> str:
    """``model.safetensors.index.json`` for a sharded plan, as ``save_pretrained`` writes it."""
    index = {
        "metadata": {"total_parameters": total_parameters, **plan.metadata},
        "weight_map": plan.weight_map,
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


class ShardWriter:
    """Writes tensors into safetensors shards as they arrive, in a fixed key order.

    Shapes are known in advance, so every shard's header is written first and each tensor's
    bytes are appended as ``put`` receives it; tensors that arrive early wait (by reference)
    for their turn. Shards are cut like ``save_pretrained`` cuts them (:func:`plan_shards`).

    Writing happens on a background thread, so the caller's next block computes meanwhile;
    at most ``max_queued`` tensors wait in the queue (``put`` blocks beyond that). A failed
    write is raised by the next ``put`` or by ``close``. Every shard is hashed as it is
    written (``sha256``: file name -> digest).
    """

    def __init__(
        self,
        directory: Path,
        layout: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_size: int,
        total_parameters: int,
        max_queued: int = 16,
    ) -> None:
        self.directory = directory
        self.entries = {key: (shape, dtype) for key, shape, dtype in layout}
        sizes = {key: _numel(shape) * dtype.itemsize for key, shape, dtype in layout}
        self.plan = plan_shards(sizes, max_shard_size)
        self.files = self.plan.files
        self.order = [key for _, keys in self.files for key in keys]
        self.total_parameters = total_parameters
        self._next = 0
        self._file = -1
        self._handle: IO[bytes] | None = None
        self._pending: dict[str, Tensor | Chunks] = {}
        self.sha256: dict[str, str] = {}
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
        if isinstance(tensor, Chunks):
            for piece in tensor.read():
                self._emit(piece)
            return
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._emit(data.view(torch.uint8).numpy().data)

    def _emit(self, data: bytes | memoryview) -> None:
        """Append to the open shard, hashing on the way (no second read for the manifest)."""
        assert self._handle is not None  # _open_next ran first
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
        layout = [(key, self.entries[key][1], self.entries[key][0]) for key in keys]
        self._handle = (self.directory / name).open("wb")
        self._digest = hashlib.sha256()
        self._emit(encode_header(layout, {"format": "pt"}))

    def close(self) -> None:
        """Finish the last shard and write the index; every key must have been written."""
        while self._queued:
            self._queued.popleft().result()
        self._pool.shutdown(wait=True)
        self._finish_shard()
        if self._next != len(self.order):
            raise RuntimeError(f"export incomplete: '{self.order[self._next]}' was never written")
        if self.plan.is_sharded:
            text = index_text(self.plan, self.total_parameters)
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Stop writing (queued tensors are dropped) and close the open shard; harmless after
        :meth:`close`."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queued.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
