"""griffin: export prompt-pruned (GRIFFIN) feed-forward checkpoints of causal LMs."""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .architectures import ARCHITECTURES, ArchSpec, spec_for
from .errors import GriffinError
from .export import ExportResult, export
from .loader import load_pretrained
from .manifest import Manifest, read_manifest
from .scoring import griffin_statistic, keep_count, top_k_indices
from .selection import Selection, select_experts
from .slicing import prune_model

if TYPE_CHECKING:
    from .runtime import GriffinRuntime

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ExportResult",
    "GriffinError",
    "GriffinRuntime",
    "Manifest",
    "Selection",
    "__version__",
    "export",
    "griffin_statistic",
    "keep_count",
    "load_pretrained",
    "prune_model",
    "read_manifest",
    "select_experts",
    "spec_for",
    "top_k_indices",
]


def __getattr__(name: str) -> Any:
    """``GriffinRuntime`` is imported on first use (it pulls in verification and generation)."""
    if name == "GriffinRuntime":
        from .runtime import GriffinRuntime

        return GriffinRuntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
