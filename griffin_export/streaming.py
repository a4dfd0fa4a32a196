"""Streaming export: never hold more than one decoder block of the source in memory.

The source is loaded with every decoder block offloaded to "disk" (``device_map``), which for
a safetensors source makes ``transformers``/``accelerate`` read each block's weights straight
from the source files just before the block runs and drop them after; embeddings, positions,
masks and the blocks' own math are those of ``transformers`` for the architecture. The
prompt's forward (the same hooks and statistic as the in-memory path) then chooses the experts,
and the output shards are written one at a time from memory-mapped source tensors, slicing the
FF tensors on the way. The result is bit-identical to the in-memory path.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .architectures import ArchSpec
from .checkpoint import MappedSafetensors, weights_fingerprint
from .selection import Selection
from .slicing import slice_bias, slice_weight

INDEX_NAME = "model.safetensors.index.json"


def offload_device_map(spec: ArchSpec, config: Any, device: str) -> dict[str, str]:
    """Every module on ``device`` except the decoder blocks, which stay on disk.

    Modules are named one by one along the path to the blocks (``{"": device}`` would break
    tied embeddings in accelerate's dispatch), using a weightless skeleton of the model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    placement: dict[str, str] = {}
    parts = spec.layers.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = skeleton.get_submodule(parent) if parent else skeleton
        for name, _ in module.named_children():
            if name != parts[depth]:
                placement[f"{parent}.{name}" if parent else name] = device
    n_layers = len(spec.blocks(skeleton))
    placement.update({f"{spec.layers}.{i}": "disk" for i in range(n_layers)})
    return placement


@dataclass
class StreamPlan:
    """What the streamed export writes: output key -> (shape, dtype) in write order, and the
    FF keys to slice (key -> (layer, role, kind))."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    ff: dict[str, tuple[int, str, str]]
    axes: dict[str, int]  # FF weight key -> its neuron axis

    def out_shape(self, key: str, k: int | None = None, d_ff: int | None = None) -> tuple[int, ...]:
        """Shape of ``key`` in the output: FF tensors lose ``d_ff - k`` neurons (fused
        gate/up: twice that) along their neuron axis."""
        shape = list(self.shapes[key][0])
        if k is None or d_ff is None or key not in self.ff:
            return tuple(shape)
        _, role, kind = self.ff[key]
        if kind == "bias" and role == "down":
            return tuple(shape)
        axis = 0 if kind == "bias" else self.axes[key]
        shape[axis] = shape[axis] // d_ff * k
        return tuple(shape)

    def nbytes(self, key: str, k: int | None = None, d_ff: int | None = None) -> int:
        numel = 1
        for n in self.out_shape(key, k, d_ff):
            numel *= n
        return numel * self.shapes[key][1].itemsize


def plan(model: Any, spec: ArchSpec) -> StreamPlan:
    """The keys ``save_pretrained`` would write for ``model`` (tied weights once)."""
    from transformers.modeling_utils import (
        remove_tied_weights_from_state_dict,
        revert_weight_conversion,
    )

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    # Keys as the checkpoint spells them (e.g. GPT-NeoX's `embed_out` for `lm_head`): the
    # source files and save_pretrained's output both use that format.
    state = revert_weight_conversion(model, state)
    shapes = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    ff: dict[str, tuple[int, str, str]] = {}
    axes: dict[str, int] = {}
    for layer in range(len(spec.blocks(model))):
        for role in spec.roles():
            for kind in ("weight", "bias"):
                key = spec.param_name(layer, role, kind)
                if key in shapes:
                    ff[key] = (layer, role, kind)
                    axes[key] = spec.neuron_axis(role) if kind == "weight" else 0
    return StreamPlan(shapes, ff, axes)


def source_fingerprint(stream: StreamPlan, source: MappedSafetensors) -> str:
    """The manifest fingerprint (see ``checkpoint.model_fingerprint``) from the source files."""
    return weights_fingerprint(
        (key, source.get(key).to(stream.shapes[key][1])) for key in stream.ff
    )


def weights_writer(
    model: Any,
    spec: ArchSpec,
    stream: StreamPlan,
    source_dir: Path,
    selection: Selection,
    max_shard_size: int,
) -> Callable[[Path], None]:
    """A function writing the pruned weights into a directory, one tensor in memory at a time.

    Each tensor is read from the source (a short-lived ``safe_open``, so no mapping of the
    source stays resident), sliced if it is an FF tensor, and appended to its shard.
    """
    from transformers.modeling_utils import revert_weight_conversion

    live = revert_weight_conversion(model, dict(model.state_dict()))
    where = source_files(source_dir)
    k = selection.k_per_layer[0]

    def tensor(key: str) -> Tensor:
        dtype = stream.shapes[key][1]
        value = live.get(key)
        if value is None or value.device.type == "meta":
            with safe_open(str(where[key]), framework="pt") as handle:
                value = handle.get_tensor(key)
        value = value.to("cpu", dtype)
        if key in stream.ff:
            layer, role, kind = stream.ff[key]
            keep = selection.keep[layer]
            if kind == "weight":
                return slice_weight(spec, role, value, keep, selection.d_ff)
            return slice_bias(role, value, keep, selection.d_ff)
        return value

    def write(directory: Path) -> None:
        shards: list[list[str]] = [[]]
        size = 0
        for key in stream.shapes:
            nbytes = stream.nbytes(key, k, selection.d_ff)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for name, keys in zip(names, shards, strict=True):
            entries = [
                (key, stream.out_shape(key, k, selection.d_ff), stream.shapes[key][1])
                for key in keys
            ]
            write_safetensors(directory / name, entries, tensor)
            weight_map.update(dict.fromkeys(keys, name))
        if len(shards) > 1:
            total = sum(stream.nbytes(key, k, selection.d_ff) for key in stream.shapes)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    return write


def source_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file of ``directory`` that holds it."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    where: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))
    return where


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], Tensor],
) -> None:
    """Write a safetensors file tensor by tensor: the header first (shapes are known), then
    each tensor's bytes as ``produce(key)`` returns it, so only one tensor is ever in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        numel = 1
        for n in shape:
            numel *= n
        size = numel * dtype.itemsize
        header[key] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, shape, dtype in entries:
            value = produce(key)
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise RuntimeError(f"{key}: planned {shape} {dtype}, got {tuple(value.shape)}")
            handle.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
