"""Safetensors checkpoints in and out: the one place that lists a checkpoint's shards, reads
headers and tensors (whole, in pieces, or row/column subsets) and writes shards.

Reading: one class, :class:`SafetensorsReader`, serves every reader (verify, inspect, the
streaming export, opening an export, the refresh runtime). It opens each file with
``safetensors.safe_open`` (its checks, ``get_slice`` for row and column subsets) and reads the
header with :func:`read_header`, the package's only header parser, for where each tensor's
bytes lie: whole tensors and ranges are read with plain ``preadv`` reads of just those bytes,
large unchanged tensors are copied through in chunks, and single tensors are memory-mapped
where only the touched pages should be read.

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
import math
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

from griffin_export.errors import ModelLoadError, UsageError, first_line

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype codes -> torch dtypes (the codes griffin reads and writes)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
#: torch dtypes -> safetensors dtype codes
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    dtype: code for code, dtype in SAFETENSORS_DTYPES.items()
}


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
                f"'{index}' is unreadable or malformed ({first_line(e)}); re-download, "
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
    """Where one tensor lies: file, safetensors dtype code (``"BF16"``...), shape, absolute
    byte offset and length."""

    path: Path
    code: str
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


def payload_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file (file size minus its header)."""
    _, base = read_header(path)
    return Path(path).stat().st_size - base


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunks:
    """A tensor handed to :class:`ShardWriter` as its raw bytes, produced piece by piece by
    ``read()`` only when the writer gets to it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], Iterator[memoryview]]


class SafetensorsReader:
    """The tensors of safetensors files by checkpoint key, read only as far as asked.

    Every file is opened with ``safetensors.safe_open`` (which checks that its header parses
    and covers the file exactly: a truncated or corrupted file fails here, with
    ``SafetensorError``), and its header is read for where each tensor's bytes lie. Then:

    * :meth:`get`: a whole tensor, read with plain file I/O (``preadv``) into a fresh tensor,
      not through a memory map: the pages pass through the page cache but never count as the
      process's memory, so only the tensors asked for (and still referenced) do;
    * :meth:`flat`: a range of the flattened tensor (only those bytes are read);
      :meth:`select`: rows, or the column range spanned by an index (``get_slice``);
    * :meth:`chunks`: the bytes in pieces through one reused buffer (copying a tensor through
      costs the buffer, not the tensor); :meth:`read_ahead`: page-cache hints;
    * :meth:`map`: a view of a private memory map of one tensor's bytes, read (and counted
      as the process's memory) only where touched.

    Use as a context manager or call :meth:`close`; tensors from :meth:`map` stay valid after
    it. Reads are thread-safe (the streaming export reads on two threads).
    """

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        self.paths = [Path(path) for path in files]
        self._stack = contextlib.ExitStack()
        self._slices: dict[Path, Any] = {}
        self._entries: dict[str, Entry] = {}
        self._keys: list[str] = []
        self._metadata: dict[Path, dict[str, str]] = {}
        self._files: dict[Path, IO[bytes]] = {}
        self._lock = threading.Lock()
        self.mapped_bytes = 0  #: bytes of the memory maps :meth:`map` made
        try:
            for path in self.paths:
                handle = self._stack.enter_context(safe_open(str(path), "pt"))
                self._slices[path] = handle
                self._keys.extend(handle.keys())  # safe_open's order: sorted by name
                header, base = read_header(path)
                self._metadata[path] = dict(header.pop("__metadata__", None) or {})
                for key, info in header.items():  # the file's order
                    begin, end = info["data_offsets"]
                    self._entries[key] = Entry(
                        path, str(info["dtype"]), tuple(info["shape"]), base + begin, end - begin
                    )
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsReader:
        """The tensors of a checkpoint directory (its shards, :func:`list_shards`);
        ``ModelLoadError`` when it has none."""
        files = list_shards(directory).files
        if not files:
            raise ModelLoadError(
                f"'{directory}' has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                "pass a directory holding *.safetensors weights"
            )
        return cls(files)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()

    # -- what the headers say

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self, path: Path) -> dict[str, str]:
        """The ``__metadata__`` of one of the files (empty if it has none)."""
        return dict(self._metadata[Path(path)])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def nbytes(self, key: str) -> int:
        return self._entries[key].nbytes

    def dtype_code(self, key: str) -> str:
        """The safetensors dtype code (``"BF16"``...), also one griffin does not read."""
        return self._entries[key].code

    def dtype(self, key: str) -> torch.dtype:
        """The torch dtype of ``key``; ``ModelLoadError`` for one griffin does not read."""
        entry = self._entries[key]
        dtype = SAFETENSORS_DTYPES.get(entry.code)
        if dtype is None:
            raise ModelLoadError(
                f"'{entry.path}' stores '{key}' as {entry.code}, which griffin does not read; "
                "convert the checkpoint to a float dtype"
            )
        return dtype

    def first_float_dtype(self) -> torch.dtype | None:
        """dtype of the first floating-point tensor of the first file (``dtype="auto"`` when
        the config names none, as ``from_pretrained`` decides it)."""
        for entry in self._entries.values():
            dtype = SAFETENSORS_DTYPES.get(entry.code)
            if entry.path == self.paths[0] and dtype is not None and dtype.is_floating_point:
                return dtype
        return None

    # -- reading tensors

    def get(self, key: str) -> Tensor:
        """The whole tensor ``key`` as stored (CPU, the file's dtype)."""
        return self._read(key, 0, self._entries[key].nbytes).reshape(self.shape(key))

    def flat(self, key: str, start: int, stop: int) -> Tensor:
        """Elements ``start:stop`` of the tensor flattened (only those are read)."""
        size = self.dtype(key).itemsize
        numel = math.prod(self.shape(key))
        start, stop = min(max(start, 0), numel), min(max(stop, 0), numel)
        return self._read(key, start * size, max(stop - start, 0) * size)

    def select(self, key: str, index: Tensor, axis: int) -> Tensor:
        """``tensor.index_select(axis, index)`` reading only the rows (``axis=0``) or the
        column range spanned by ``index`` (``axis=1``), not the whole tensor."""
        dtype = self.dtype(key)
        if index.numel() == 0:
            shape = list(self.shape(key))
            shape[axis] = 0
            return torch.empty(shape, dtype=dtype)
        lo, hi = int(index.min()), int(index.max()) + 1
        part = self._slices[self._entries[key].path].get_slice(key)
        block: Tensor = part[lo:hi] if axis == 0 else part[:, lo:hi]
        return block.index_select(axis, index.long() - lo)

    def chunks(self, key: str, chunk_bytes: int = 16 << 20) -> Chunks:
        """The bytes of ``key`` as :class:`Chunks`: read piece by piece into one reused
        buffer when written, so copying a large unchanged tensor (an embedding, a head)
        through costs ``chunk_bytes`` of memory, not the tensor."""
        entry = self._entries[key]

        def pieces() -> Iterator[memoryview]:
            buffer = memoryview(bytearray(min(chunk_bytes, entry.nbytes)))
            for start in range(0, entry.nbytes, chunk_bytes):
                n = min(chunk_bytes, entry.nbytes - start)
                self._read_into(key, buffer[:n], entry.offset + start)
                yield buffer[:n]

        return Chunks(entry.shape, self.dtype(key), pieces)

    def read_ahead(self, keys: Sequence[str]) -> None:
        """Ask the kernel to start reading ``keys``' bytes into the page cache now
        (asynchronous; a no-op where ``posix_fadvise`` does not exist)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for key in keys:
            entry = self._entries[key]
            if entry.nbytes:
                with contextlib.suppress(OSError):
                    fd = self._handle(entry.path).fileno()
                    advise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_WILLNEED)

    def map(self, key: str) -> Tensor:
        """The tensor ``key`` as a view of a private memory map of its bytes: pages are read
        (and count as the process's memory) only where touched, e.g. the embedding rows of
        the prompt's tokens, or the original's neurons a refresh copies."""
        entry, dtype = self._entries[key], self.dtype(key)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        length = entry.offset + entry.nbytes - start
        # ACCESS_COPY: torch needs a writable buffer; nothing writes to it, and a write
        # would only ever touch private copies of the pages, never the file.
        mapped = mmap.mmap(
            self._handle(entry.path).fileno(), length, offset=start, access=mmap.ACCESS_COPY
        )
        self.mapped_bytes += length
        flat = torch.frombuffer(
            mapped,  # the tensor keeps the map alive
            dtype=dtype,
            count=entry.nbytes // dtype.itemsize,
            offset=entry.offset - start,
        )
        return flat.reshape(entry.shape)

    def _read(self, key: str, start: int, nbytes: int) -> Tensor:
        """Bytes ``start:start + nbytes`` of tensor ``key``'s data, as a 1-D tensor of its
        dtype (a fresh tensor, read with ``preadv``)."""
        dtype, entry = self.dtype(key), self._entries[key]
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(raw.numpy())  # type: ignore[arg-type]
            self._read_into(key, view, entry.offset + start)
        return raw.view(dtype)

    def _read_into(self, key: str, view: memoryview, offset: int) -> None:
        path = self._entries[key].path
        handle = self._handle(path)
        done = 0
        while done < len(view):
            n = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise ModelLoadError(
                    f"'{path}' ends inside tensor '{key}'; the file is truncated: "
                    "re-download or re-convert the model"
                )
            done += n

    def _handle(self, path: Path) -> IO[bytes]:
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = path.open("rb", buffering=0)
            return handle


def load_state(files: Iterable[Path]) -> dict[str, Tensor]:
    """Every tensor of ``files`` (a checkpoint's shards), loaded into memory."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


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
        size = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_CODES[dtype],
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
        sizes = {key: math.prod(shape) * dtype.itemsize for key, shape, dtype in layout}
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
