"""griffin: export prompt-pruned (GRIFFIN) feed-forward checkpoints of causal LMs."""

from typing import TYPE_CHECKING, Any

from griffin_export._version import __version__
from griffin_export.build.export import ExportResult, export
from griffin_export.core.architectures import ARCHITECTURES, ArchSpec, spec_for
from griffin_export.core.scoring import griffin_statistic, keep_count, top_k_indices
from griffin_export.core.selection import Selection, select_experts
from griffin_export.core.slicing import prune_model
from griffin_export.errors import GriffinError
from griffin_export.formats.loader import load_pretrained
from griffin_export.formats.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from griffin_export.runtime.refresh import GriffinRuntime

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
        from griffin_export.runtime.refresh import GriffinRuntime

        return GriffinRuntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
