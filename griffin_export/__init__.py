"""griffin: export prompt-pruned (GRIFFIN) feed-forward checkpoints of causal LMs."""

from ._version import __version__
from .architectures import ARCHITECTURES, ArchSpec, spec_for
from .errors import GriffinError
from .export import ExportResult, export
from .loader import load_pretrained
from .manifest import Manifest, read_manifest
from .scoring import griffin_statistic, keep_count, top_k_indices
from .selection import Selection, select_experts
from .slicing import prune_model

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ExportResult",
    "GriffinError",
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
