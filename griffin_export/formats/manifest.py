"""The export format: file names, the manifest (``griffin.json``) as a typed record, and its
reading, validation and writing. Nothing here loads a model, so every reader of exports
(``verify``, the runtime, ``inspect``) learns the format from here, not from the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from griffin_export.errors import ExportFormatError

FORMAT_NAME = "griffin-export"
FORMAT_VERSION = 1
#: the manifest file of an export directory
MANIFEST = "griffin.json"
#: per layer (``layer.<i>``), the original index of every kept neuron
EXPERTS_FILE = "griffin_experts.safetensors"
#: key of the per-layer widths inside the config's ``griffin`` block
SIZES_KEY = "intermediate_sizes"
#: dtype names a manifest may record
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: checkpoint layouts of ``griffin export --format``: ``hf`` (the source family's own config,
#: per-layer widths under ``griffin.intermediate_sizes``) or ``decilm`` (DeciLM / Nemotron-NAS
#: ``block_configs``, :mod:`griffin_export.formats.decilm`)
CHECKPOINT_FORMATS = ("hf", "decilm")
DEFAULT_CHECKPOINT_FORMAT = "hf"


@dataclass
class SourceInfo:
    """Where an export came from."""

    model: str
    kind: str
    directory: str | None  # where the runtime finds the full weights (GGUF: the conversion)
    model_type: str
    fingerprint: str
    d_ff: int


@dataclass
class PromptInfo:
    sha256: str
    tokens: int
    count: int
    #: ``--max-prompt-tokens`` of the export (None: only the model's context limited a prompt)
    max_tokens: int | None = None


def prompt_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompt texts (UTF-8), separated by NUL bytes: what a manifest records
    (``prompt.sha256``) and a prompt-made importance matrix names."""
    return hashlib.sha256(b"\0".join(p.encode("utf-8") for p in prompts)).hexdigest()


@dataclass
class Manifest:
    """``griffin.json``: how an export was made, and the sha256 of every file it wrote."""

    griffin_version: str
    source: SourceInfo
    ratio: float
    multiple_of: int
    statistic: str
    k_per_layer: list[int]
    prompt: PromptInfo
    dtype: str
    budget: str = "uniform"
    #: ``{"method", "alpha", "bias"}`` of a compensated export (None: plain slices)
    compensation: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: the checkpoint layout (:data:`CHECKPOINT_FORMATS`)
    checkpoint_format: str = DEFAULT_CHECKPOINT_FORMAT
    #: the GGUF written inside the export (``export --gguf``): ``{"file", "outtype"}`` and, for
    #: a quantizer type, ``"imatrix"``: ``{"source": "prompt" | "file" | "none", ...}``
    gguf: dict[str, Any] | None = None
    #: a mixture-of-experts export: ``{"sizes", "expert_score", "layers"}``
    #: (:meth:`~griffin_export.core.moe_selection.MoeSelection.record`); ``None`` for dense
    moe: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``griffin.json`` (a uniform budget, the ``hf`` layout
        and the absence of compensation or of a GGUF are not recorded, so such manifests stay
        as they were before per-layer budgets, layouts, compensation and GGUFs existed)."""
        data: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "griffin_version": self.griffin_version,
            "source": {
                "model": self.source.model,
                "kind": self.source.kind,
                "directory": self.source.directory,
                "model_type": self.source.model_type,
                "fingerprint": self.source.fingerprint,
                "d_ff": self.source.d_ff,
            },
            "ratio": self.ratio,
            "multiple_of": self.multiple_of,
            **({} if self.budget == "uniform" else {"budget": self.budget}),
            "statistic": self.statistic,
            "k_per_layer": list(self.k_per_layer),
            "prompt": {
                "sha256": self.prompt.sha256,
                "tokens": self.prompt.tokens,
                "count": self.prompt.count,
                **({"max_tokens": self.prompt.max_tokens} if self.prompt.max_tokens else {}),
            },
            "dtype": self.dtype,
            **({} if self.compensation is None else {"compensation": dict(self.compensation)}),
            **(
                {}
                if self.checkpoint_format == DEFAULT_CHECKPOINT_FORMAT
                else {"checkpoint_format": self.checkpoint_format}
            ),
            **({} if self.gguf is None else {"gguf": dict(self.gguf)}),
            **({} if self.moe is None else {"moe": dict(self.moe)}),
            "files": dict(self.files),
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from its JSON object; raises ``ExportFormatError`` naming the first
        problem (:func:`manifest_problems`)."""
        problems = manifest_problems(data)
        if problems:
            raise ExportFormatError(f"{MANIFEST}: {problems[0]}")
        source, prompt = data["source"], data.get("prompt")
        prompt = prompt if isinstance(prompt, dict) else {}
        return cls(
            griffin_version=str(data.get("griffin_version", "")),
            source=SourceInfo(
                model=str(source.get("model", "")),
                kind=str(source.get("kind", "")),
                directory=source.get("directory"),
                model_type=source["model_type"],
                fingerprint=source["fingerprint"],
                d_ff=source["d_ff"],
            ),
            ratio=float(data.get("ratio", 0.0)),
            multiple_of=int(data.get("multiple_of", 1)),
            statistic=str(data.get("statistic", "")),
            k_per_layer=list(data["k_per_layer"]),
            prompt=PromptInfo(
                sha256=str(prompt.get("sha256", "")),
                tokens=int(prompt.get("tokens", 0)),
                count=int(prompt.get("count", 0)),
                max_tokens=None if prompt.get("max_tokens") is None else int(prompt["max_tokens"]),
            ),
            dtype=data["dtype"],
            budget=str(data.get("budget", "uniform")),
            compensation=data.get("compensation"),
            files=dict(data["files"]),
            checkpoint_format=str(data.get("checkpoint_format", DEFAULT_CHECKPOINT_FORMAT)),
            gguf=data.get("gguf"),
            moe=data.get("moe"),
            format=data["format"],
            format_version=data["format_version"],
        )


#: optional records of a manifest: name -> the fields each must have, with their types
_OPTIONAL_RECORDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "compensation": {"method": str, "bias": bool},
    "gguf": {"file": str, "outtype": str},
    "moe": {"sizes": dict, "expert_score": str, "layers": list},
}


def manifest_problems(data: Any) -> list[str]:
    """What makes ``data`` not a manifest this griffin reads (empty when it is one); one
    line each, without the file name."""
    if not isinstance(data, dict):
        return ["not a JSON object; re-export"]
    if data.get("format") != FORMAT_NAME:
        return [f"format is not '{FORMAT_NAME}'; re-export"]
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        return [
            f"format_version {version!r} is not one this griffin reads (up to "
            f"{FORMAT_VERSION}); upgrade griffin or re-export"
        ]
    source = data.get("source")
    bad: list[str] = []
    if not isinstance(source, dict):
        bad.append("source")
    else:
        if not is_int(source.get("d_ff")) or source["d_ff"] < 1:
            bad.append("source.d_ff")
        if not isinstance(source.get("model_type"), str):
            bad.append("source.model_type")
        if not isinstance(source.get("fingerprint"), str):
            bad.append("source.fingerprint")
    ks = data.get("k_per_layer")
    if not isinstance(ks, list) or not ks or not all(is_int(k) and k > 0 for k in ks):
        bad.append("k_per_layer")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        bad.append("files")
    if data.get("dtype") not in DTYPE_NAMES:
        bad.append("dtype")
    if data.get("checkpoint_format", DEFAULT_CHECKPOINT_FORMAT) not in CHECKPOINT_FORMATS:
        bad.append("checkpoint_format")
    for name, fields in _OPTIONAL_RECORDS.items():
        record = data.get(name)
        if record is not None and not (
            isinstance(record, dict)
            and all(isinstance(record.get(key), kind) for key, kind in fields.items())
        ):
            bad.append(name)
    return [f"missing or malformed {', '.join(bad)}; re-export"] if bad else []


def read_manifest(export_dir: str | Path) -> Manifest:
    """The manifest of an export directory; raises ``ExportFormatError`` if it is not one."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportFormatError(
            f"'{export_dir}' is not a griffin export (no {MANIFEST}); run griffin export first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportFormatError(f"'{path}' is unreadable ({exc}); re-run griffin export") from exc
    problems = manifest_problems(data)
    if problems:
        raise ExportFormatError(f"'{path}': {problems[0]}")
    return Manifest.from_dict(data)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``griffin.json`` into ``directory``."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    (Path(directory) / MANIFEST).write_text(text, encoding="utf-8")


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a griffin manifest."""
    return (Path(path) / MANIFEST).is_file()


def is_int(value: object) -> bool:
    """Whether a JSON value is an integer (``True``/``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)
