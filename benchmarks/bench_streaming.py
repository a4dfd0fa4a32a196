"""Streaming export against the in-memory path and a plain read-once-write-once copy, and
how the streaming export's peak memory grows with depth.

Two parts, each run in fresh subprocesses (wall time and peak RSS from the kernel's rusage),
each run into a fresh output directory after a sync. Synthetic Llama-architecture checkpoints
(random bf16 weights, untied head, 1 GB shards) are built once under --work (default: a
folder in the system temp directory; never inside the repository).

``speed`` (hidden 2048, d_ff 5632, 32 layers, vocab 49152: ~3.7 GB), --reps times
interleaved:

  copy       load every source shard with safetensors and save it again (read once, write once)
  streaming  griffin export --ratio 0.5 with a 512-token prompt (the default path)
  in-memory  the same export with --in-memory

``depth`` (hidden 1536, d_ff 6144, vocab 49152; 8 and 32 layers): griffin export (streaming)
--ratio 0.5 with a 140-token prompt, ``--compensate none`` and ``--compensate refit`` side by
side: the growth of peak RSS from 8 to 32 layers against the checkpoint bytes the 24 added
layers bring (target: at most 1%, i.e. nothing per layer is held beyond the layer).

Usage: python benchmarks/bench_streaming.py [--part speed|depth|all] [--work DIR] [--reps 3]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden": 2048, "d_ff": 5632, "layers": 32, "vocab": 49152, "heads": 16}
#: The depth part's model (the shape the issue measured): built with 8 and with 32 layers.
DEPTH_SHAPE = {"hidden": 1536, "d_ff": 6144, "vocab": 49152, "heads": 12}
DEPTHS = (8, 32)
#: The names of the three runs :func:`copy_streaming_in_memory` compares.
COPY, STREAMING, IN_MEMORY = (
    "copy (read once, write once)",
    "griffin export (streaming)",
    "griffin export --in-memory",
)
#: What names a run in :func:`run_all` (a string, or a tuple such as (run, depth)).
Key = TypeVar("Key")


def build(directory: Path, shape: dict[str, int] = SHAPE) -> int:
    """Write the synthetic checkpoint of ``shape`` (tensor by tensor) unless it exists;
    return its bytes."""
    from transformers import AutoTokenizer, LlamaConfig

    from griffin_export.storage.safetensors_io import ShardWriter
    from griffin_export.storage.sources import resolve_source

    done = directory / "config.json"
    if not done.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        h, f, v = shape["hidden"], shape["d_ff"], shape["vocab"]
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(shape["layers"]):
            p = f"model.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{p}.self_attn.{name}.weight"] = (h, h)
            shapes[f"{p}.mlp.gate_proj.weight"] = (f, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (f, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, f)
            shapes[f"{p}.input_layernorm.weight"] = (h,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
        generator = torch.Generator().manual_seed(0)

        def produce(key: str) -> torch.Tensor:
            if key.endswith("norm.weight"):
                return torch.ones(shapes[key], dtype=torch.bfloat16)
            return (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)

        entries = [(key, shape, torch.bfloat16) for key, shape in shapes.items()]
        params = sum(int(torch.tensor(shape).prod()) for shape in shapes.values())
        writer = ShardWriter(directory, entries, 1_000_000_000, params)
        for key in shapes:
            writer.put(key, produce(key))
        writer.close()
        tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").directory)
        tokenizer.save_pretrained(directory)
        LlamaConfig(
            vocab_size=v,
            hidden_size=h,
            intermediate_size=f,
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"],
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ).save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


COPY_SCRIPT = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
"""


#: Runs one command and prints its wall seconds and peak RSS. Linux starts a child's
#: ``ru_maxrss`` at the RSS of the process it was forked from (the high-water mark survives
#: ``exec``), so a child of this script, which holds torch and built the checkpoints, would
#: report at least this script's RSS; a child of this small launcher reports its own peak.
LAUNCH = """
import os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss * 1024)
"""


def measure(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of one subprocess, from the kernel's rusage of exactly
    that child (``wait4``; Linux reports ``ru_maxrss`` in KiB), started by :data:`LAUNCH`."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, *args], capture_output=True, text=True, check=True
    ).stdout.split()
    if int(out[0]) != 0:
        raise SystemExit(f"{args[:3]} failed")
    return float(out[1]), float(out[2])


def run_all(
    runs: dict[Key, tuple[list[str], Path]], reps: int
) -> dict[Key, list[tuple[float, float]]]:
    """``reps`` interleaved rounds of every run, each into a fresh output directory after a
    sync: ``{name: [(wall seconds, peak RSS bytes)]}``."""
    seen: dict[Key, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, (command, output) in runs.items():
            shutil.rmtree(output, ignore_errors=True)  # every run writes a fresh directory
            os.sync()  # and starts with no dirty pages of the previous one
            seen[name].append(measure(command))
    return seen


def copy_streaming_in_memory(
    source: Path, export: list[str], work: Path
) -> dict[str, tuple[list[str], Path]]:
    """The three runs compared (for :func:`run_all`): a copy of ``source``'s shards, the
    ``export`` command (streaming) and the same with ``--in-memory``, each into ``work``."""
    return {
        COPY: (
            [sys.executable, "-c", COPY_SCRIPT, str(source), str(work / "copy")],
            work / "copy",
        ),
        STREAMING: ([*export, "--out", str(work / "s")], work / "s"),
        IN_MEMORY: (
            [*export, "--in-memory", "--out", str(work / "m")],
            work / "m",
        ),
    }


def emit(report: str, out: Path | None) -> None:
    """Print ``report``, and append it to ``out`` if given."""
    print(report)
    if out:
        with out.open("a", encoding="utf-8") as handle:
            handle.write(report + "\n")


def speed(args: argparse.Namespace, griffin: list[str], prompt: Path) -> str:
    """The copy / streaming / in-memory comparison (Markdown)."""
    source = args.work / "synthetic-llama"
    size = build(source)
    export = [*griffin, "--model", str(source), "--prompt", str(prompt)]
    common = [*export, "--max-prompt-tokens", "512", "--ratio", "0.5", "--force"]
    seen = run_all(copy_streaming_in_memory(source, common, args.work), args.reps)
    rows = {
        name: (statistics.median(s for s, _ in v), max(r for _, r in v)) for name, v in seen.items()
    }
    base = rows[COPY][0]
    lines = [
        f"Synthetic Llama {SHAPE}, bf16, {size / 1e9:.2f} GB in 1 GB shards; 512-token prompt, "
        f"--ratio 0.5; torch {torch.__version__}, {os.cpu_count()} CPUs",
        "",
        "| run | wall s (median) | all runs | vs copy | peak RSS (max) | RSS / source bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, (seconds, rss) in rows.items():
        lines.append(
            f"| {name} | {seconds:.1f} | {', '.join(f'{t:.1f}' for t, _ in seen[name])} | "
            f"{seconds / base:.2f}x | {rss / 2**30:.2f} GiB | "
            f"{rss / size:.0%} |"
        )
    return "\n".join(lines)


def depth(args: argparse.Namespace, griffin: list[str], text: str) -> str:
    """Peak RSS of the streaming export at 8 and 32 layers, ``none`` beside ``refit``
    (Markdown)."""
    sizes = {}
    for layers in DEPTHS:
        shape = {**DEPTH_SHAPE, "layers": layers}
        sizes[layers] = build(args.work / f"synthetic-llama-{layers}l", shape)
    prompt_args = []
    for i in range(args.prompts):  # disjoint pieces of the corpus, one prompt each
        path = args.work / f"depth-prompt-{i}.txt"
        path.write_text(text[i * 1500 : (i + 1) * 1500], encoding="utf-8")
        prompt_args += ["--prompt", str(path)]
    runs = {}
    for method in ("none", "refit"):
        for layers in DEPTHS:
            out = args.work / f"depth-{method}-{layers}"
            command = [
                *griffin,
                "--model",
                str(args.work / f"synthetic-llama-{layers}l"),
                *prompt_args,
                "--max-prompt-tokens",
                "140",
                "--ratio",
                "0.5",
                "--compensate",
                method,
                "--force",
                "--out",
                str(out),
            ]
            runs[f"{method} {layers}"] = (command, out)
    seen = run_all(runs, args.reps)
    peak = {name: statistics.median(r for _, r in v) for name, v in seen.items()}
    few, many = DEPTHS
    added = sizes[many] - sizes[few]
    lines = [
        f"Synthetic Llama {DEPTH_SHAPE}, bf16, {few} layers {sizes[few] / 1e9:.2f} GB / "
        f"{many} layers {sizes[many] / 1e9:.2f} GB; {args.prompts} prompt(s) of at most 140 "
        f"tokens, --ratio 0.5, streaming; peak RSS median of {args.reps}; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs",
        "",
        f"| --compensate | peak RSS {few} layers | peak RSS {many} layers | growth | "
        f"growth / added checkpoint bytes ({added / 2**20:.0f} MiB) | all runs {few} / {many} "
        "(MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for method in ("none", "refit"):
        low, high = peak[f"{method} {few}"], peak[f"{method} {many}"]
        runs_few = ", ".join(f"{r / 2**20:.0f}" for _, r in seen[f"{method} {few}"])
        runs_many = ", ".join(f"{r / 2**20:.0f}" for _, r in seen[f"{method} {many}"])
        lines.append(
            f"| {method} | {low / 2**20:.0f} MiB | {high / 2**20:.0f} MiB | "
            f"{(high - low) / 2**20:+.1f} MiB | {(high - low) / added:+.2%} | "
            f"{runs_few} / {runs_many} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "griffin-bench")
    parser.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--part", choices=("speed", "depth", "all"), default="all")
    parser.add_argument("--prompts", type=int, default=1, help="prompts of the depth part")
    args = parser.parse_args()
    from griffin_export.evaluation.corpora import load_corpus

    args.work.mkdir(parents=True, exist_ok=True)
    text = load_corpus("wiki-summaries").text
    prompt = args.work / "prompt.txt"
    prompt.write_text(text[:6000], encoding="utf-8")
    griffin = [str(Path(sys.executable).parent / "griffin"), "export"]
    parts = []
    if args.part in ("speed", "all"):
        parts.append(speed(args, griffin, prompt))
    if args.part in ("depth", "all"):
        parts.append(depth(args, griffin, text))
    emit("\n\n".join(parts), args.out)


if __name__ == "__main__":
    main()
