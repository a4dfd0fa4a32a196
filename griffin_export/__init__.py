"""griffin: export prompt-pruned (GRIFFIN) feed-forward checkpoints of causal LMs.

The package is laid out by job (docs/design.md, "Layout"): ``core`` (architectures table,
statistic, budgets, slicing, refit, capture hooks), ``storage`` (sources and checkpoint I/O),
``formats`` (the export format, loading and verifying exports), ``build`` (the export
pipeline), ``evaluation`` (perplexity, task accuracy, inspection), ``runtime`` (generation
with refresh) and ``engines`` (llama.cpp). The names below are the public API.
"""

from griffin_export._version import __version__
from griffin_export.build.export import ExportResult, export
from griffin_export.build.reproduce import verify_with_prompt
from griffin_export.core.architectures import ARCHITECTURES, ArchSpec, spec_for
from griffin_export.core.scoring import griffin_statistic, keep_count, top_k_indices
from griffin_export.core.selection import Selection, select_experts
from griffin_export.core.slicing import prune_model
from griffin_export.engines.llamacpp import write_gguf
from griffin_export.errors import GriffinError
from griffin_export.evaluation.ppl import perplexity
from griffin_export.evaluation.taskeval import evaluate_tasks
from griffin_export.formats.layout import load_pretrained
from griffin_export.formats.manifest import Manifest, read_manifest
from griffin_export.formats.verify import VerifyReport, verify_export
from griffin_export.runtime.refresh import GriffinRuntime

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ExportResult",
    "GriffinError",
    "GriffinRuntime",
    "Manifest",
    "Selection",
    "VerifyReport",
    "__version__",
    "evaluate_tasks",
    "export",
    "griffin_statistic",
    "keep_count",
    "load_pretrained",
    "perplexity",
    "prune_model",
    "read_manifest",
    "select_experts",
    "spec_for",
    "top_k_indices",
    "verify_export",
    "verify_with_prompt",
    "write_gguf",
]
