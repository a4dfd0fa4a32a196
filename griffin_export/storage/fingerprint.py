"""Cheap identities of weights and files: sampled fingerprints of tensors (what ties an export to
its original) and whole-file sha256 digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import ArchSpec
from griffin_export.core.moe import ff_block_tensors, identity_tensors


def weights_fingerprint(named_tensors: Iterable[tuple[str, Tensor]], sample: int = 4096) -> str:
    """A cheap identity for a set of weights: sha256 over names, shapes and three contiguous
    samples (start, middle, end) of every tensor, as float32.

    Any fine-tune or different model changes it; it reads only a few KiB per tensor, so it
    works on memory-mapped originals too.
    """
    return samples_fingerprint(
        (name, tuple(tensor.shape), fingerprint_samples(tensor, sample))
        for name, tensor in named_tensors
    )


def sample_ranges(numel: int, sample: int = 4096) -> list[tuple[int, int]]:
    """The ``(start, stop)`` element ranges of a flattened tensor of ``numel`` elements that
    :func:`weights_fingerprint` hashes: its first, middle and last ``sample`` elements."""
    mid = max(0, numel // 2 - sample // 2)
    return [
        (0, min(sample, numel)),
        (min(mid, numel), min(mid + sample, numel)),
        (max(0, numel - sample), numel),
    ]


def fingerprint_samples(
    tensor: Tensor, sample: int = 4096, dtype: torch.dtype | None = None
) -> Tensor:
    """The part of ``tensor`` that :func:`weights_fingerprint` hashes: its first, middle and
    last ``sample`` elements, cast to ``dtype`` (if given; only the samples are cast), as one
    float32 CPU tensor (a few KiB)."""
    flat = tensor.detach().reshape(-1)
    parts = [flat[a:b] for a, b in sample_ranges(flat.numel(), sample)]
    return samples_as_float(parts, dtype)


def samples_as_float(parts: Iterable[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Sampled elements, cast to ``dtype`` first if given, as one float32 CPU tensor."""
    return torch.cat(
        [(part if dtype is None else part.to(dtype)).to("cpu", torch.float32) for part in parts]
    )


def samples_fingerprint(entries: Iterable[tuple[str, tuple[int, ...], Tensor]]) -> str:
    """:func:`weights_fingerprint` from ``(name, shape, fingerprint_samples(tensor))``, so a
    caller can take the samples while each tensor is in memory and hash them later."""
    digest = hashlib.sha256()
    for name, shape, samples in sorted(entries, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(shape)}|".encode())
        digest.update(samples.contiguous().numpy().tobytes())
    return "sha256-sampled:" + digest.hexdigest()


def ff_tensors(spec: ArchSpec, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint key, tensor)`` of every FF weight and bias of a loaded model (of a
    mixture of experts: :func:`~griffin_export.core.moe.identity_tensors`)."""
    if spec.moe is not None:
        yield from identity_tensors(spec, model)
        return
    for layer, block in enumerate(spec.blocks(model)):
        yield from ff_block_tensors(spec, layer, block)


def model_fingerprint(spec: ArchSpec, model: nn.Module) -> str:
    """:func:`weights_fingerprint` of a model's full-width FF tensors.

    Only the FF tensors count: they are what the runtime and ``verify`` slice from the
    original, and they can be read by checkpoint key from memory-mapped safetensors.
    """
    return weights_fingerprint(ff_tensors(spec, model))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
