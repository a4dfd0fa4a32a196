"""The full model and its griffin export side by side: the same prompt's text, perplexity on a
held-out corpus slice, and the bytes on disk.

Usage: python examples/demo.py EXPORT_DIR [PROMPT]   (make demo runs it on demo-export)
"""

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from griffin_export import read_manifest
from griffin_export.evaluation.ppl import perplexity
from griffin_export.storage.sources import resolve_source

export_dir = Path(sys.argv[1])
prompt = sys.argv[2] if len(sys.argv) > 2 else "The water cycle begins when"
manifest = read_manifest(export_dir)
# the source the manifest recorded (as griffin ppl finds it), else its name resolved again
recorded = manifest.source.directory
original_dir = (
    Path(recorded)
    if recorded and Path(recorded).is_dir()
    else resolve_source(manifest.source.model).directory
)
console = Console()
hf_logging.disable_progress_bar()


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors"))


def complete(directory: Path) -> str:
    """Greedy continuation of the prompt; the export loads with stock transformers."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


with console.status("Generating with both models"):
    texts = [complete(original_dir), complete(export_dir)]
with console.status("Perplexity of both on held-out text (wiki-summaries, 4 x 256 tokens)"):
    report = perplexity(
        str(export_dir), protocol="static", dataset="wiki-summaries", seq_len=256, max_windows=4
    )
ppl = [row.ppl for row in report.rows]  # the full model first, then the export
sizes = [weight_bytes(original_dir), weight_bytes(export_dir)]

table = Table(
    title=f"{manifest.source.model}: full vs griffin export, keep {manifest.ratio:g} "
    f"of FF neurons (chosen on a {manifest.prompt.tokens}-token prompt)",
    title_justify="left",
    show_lines=True,
)
table.add_column("")
table.add_column("full model", ratio=1)
table.add_column(f"export ({export_dir})", ratio=1)
table.add_row("text", *texts)
table.add_row(
    f"perplexity\n{report.dataset}\n{report.tokens_scored:,} tokens",
    f"{ppl[0]:.2f}",
    f"{ppl[1]:.2f} ({ppl[1] / ppl[0]:.2f}x)",
)
table.add_row(
    "weight bytes",
    f"{sizes[0] / 1e6:.1f} MB",
    f"{sizes[1] / 1e6:.1f} MB ({sizes[1] / sizes[0]:.2f}x)",
)
console.print(table)
