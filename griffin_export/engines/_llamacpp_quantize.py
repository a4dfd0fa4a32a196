"""Run llama.cpp's own quantizer (``llama_model_quantize``, through ``llama-cpp-python``) on a
GGUF file.

This file is a *script*, started by :func:`griffin_export.engines.quantize.quantize_gguf` in a
child process, so a failing or aborting llama.cpp (it aborts the process on some errors), a
time limit and Ctrl-C stop the child, never the caller. It imports nothing from griffin.

Usage: ``python _llamacpp_quantize.py IN_FILE OUT_FILE FTYPE NTHREAD VERSION``; standard input
carries one JSON line ``{"imatrix": [[name, size], ...], "kv": [[key, value], ...]}`` followed by
the importance matrix values, ``size`` float32 numbers per entry in that order. ``VERSION`` is
the binding version whose struct layout this script fills in: any other is refused.

llama.cpp writes one line per tensor (``[  12/ 272] blk.1.ffn_down.weight ...``) to standard
error, through the binding's log callback; the caller follows them for progress.
"""

from __future__ import annotations

import ctypes
import json
import sys
from typing import Any


def _entries(header: dict[str, Any], stream: Any, binding: Any) -> tuple[Any, list[Any]]:
    """The NULL-terminated ``llama_model_imatrix_data`` array (and the buffers it points into,
    which must outlive the call)."""
    entries = header.get("imatrix") or []
    array = (binding.llama_model_imatrix_data * (len(entries) + 1))()
    keep: list[Any] = [array]
    for i, (name, size) in enumerate(entries):
        raw = stream.read(4 * int(size))
        if len(raw) != 4 * int(size):
            raise SystemExit(f"ERROR: importance matrix for {name} is truncated")
        values = (ctypes.c_float * int(size)).from_buffer_copy(raw)
        encoded = str(name).encode()
        keep += [values, encoded]
        array[i].name = encoded
        array[i].data = ctypes.cast(values, ctypes.POINTER(ctypes.c_float))
        array[i].size = int(size)
    return array, keep


def _overrides(header: dict[str, Any], binding: Any) -> Any:
    """The ``llama_model_kv_override`` array (ended by an empty key) of the header's ``kv``:
    ints and strings, written into the quantized file's metadata."""
    kv = header.get("kv") or []
    array = (binding.llama_model_kv_override * (len(kv) + 1))()
    for i, (key, value) in enumerate(kv):
        array[i].key = str(key).encode()[:127]
        if isinstance(value, int):
            array[i].tag = binding.LLAMA_KV_OVERRIDE_TYPE_INT
            array[i].value.val_i64 = value
        else:
            array[i].tag = binding.LLAMA_KV_OVERRIDE_TYPE_STR
            array[i].value.val_str = str(value).encode()[:127]
    return array


def main(argv: list[str]) -> int:
    import llama_cpp

    source, target, ftype, nthread, version = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4]
    if llama_cpp.__version__ != version:
        print(
            f"ERROR: llama-cpp-python {llama_cpp.__version__} is installed; griffin's quantizer "
            f"fills in the structs of {version}: pip install 'llama-cpp-python=={version}'",
            file=sys.stderr,
        )
        return 2
    stream = sys.stdin.buffer
    header = json.loads(stream.readline())
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep: list[Any] = []
    if header.get("imatrix"):
        array, keep = _entries(header, stream, llama_cpp)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if header.get("kv"):
        overrides = _overrides(header, llama_cpp)
        keep.append(overrides)
        params.kv_overrides = ctypes.cast(
            overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override)
        )
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    del keep
    if code != 0:
        print(f"ERROR: llama_model_quantize returned {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
