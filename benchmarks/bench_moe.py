"""Mixture-of-experts export: streaming against in memory (and a plain copy), side by side.

A synthetic Qwen3-MoE checkpoint (random bf16 weights, per-expert tensors as save_pretrained
writes them) is built once under --work (default: a folder in the system temp directory).
Default shape: 8 layers, 32 routed experts of width 128, top-4, hidden 256 (``--layers``,
``--experts``, ``--hidden``, ``--width``, ``--top-k`` change it). Each run is a fresh
subprocess (wall time and peak RSS from the kernel's rusage, as in bench_streaming.py), into
a fresh output directory after a sync, ``--reps`` times interleaved:

  copy       load every source shard with safetensors and save it again
  streaming  griffin export --experts 0.25 --ratio 0.5 (the default path)
  in-memory  the same export with --in-memory

Usage: python benchmarks/bench_moe.py [--work DIR] [--reps 3] [--tokens 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_streaming import copy_streaming_in_memory, emit, run_all

ROOT = Path(__file__).resolve().parents[1]


def build(directory: Path, args: argparse.Namespace) -> int:
    """Write the synthetic checkpoint unless it exists; return its weight bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from griffin_export.storage.sources import resolve_source

    if not (directory / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").directory)
        config = Qwen3MoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            moe_intermediate_size=args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=args.hidden // 4,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(directory, max_shard_size="200MB")
        tokenizer.save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "griffin-moe")
    parser.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    from griffin_export.evaluation.corpora import load_corpus

    args.work.mkdir(parents=True, exist_ok=True)
    prompt = args.work / "prompt.txt"
    prompt.write_text(load_corpus("wiki-summaries").text[:20000], encoding="utf-8")
    source = args.work / f"qwen3moe-{args.layers}x{args.experts}-h{args.hidden}-w{args.width}"
    size = build(source, args)
    griffin = [str(Path(sys.executable).parent / "griffin"), "export"]
    common = [
        *griffin,
        "--model",
        str(source),
        "--prompt",
        str(prompt),
        "--max-prompt-tokens",
        str(args.tokens),
        "--experts",
        "0.25",
        "--ratio",
        "0.5",
        "--force",
    ]
    seen = run_all(copy_streaming_in_memory(source, common, args.work), args.reps)
    rows = {
        name: (statistics.median(s for s, _ in v), max(r for _, r in v)) for name, v in seen.items()
    }
    out_bytes = sum(p.stat().st_size for p in (args.work / "s").glob("model*.safetensors"))
    lines = [
        f"Synthetic Qwen3-MoE, {args.layers} layers, {args.experts} experts x width "
        f"{args.width}, top-{args.top_k}, hidden {args.hidden}, bf16: {size / 1e6:.1f} MB -> "
        f"{out_bytes / 1e6:.1f} MB; {args.tokens}-token prompt, --experts 0.25 --ratio 0.5 "
        f"(refit); torch {torch.__version__}, {os.cpu_count()} CPUs",
        "",
        "| run | wall s (median) | all runs | peak RSS (max) | RSS / source bytes |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, rss) in rows.items():
        lines.append(
            f"| {name} | {seconds:.2f} | {', '.join(f'{t:.2f}' for t, _ in seen[name])} | "
            f"{rss / 2**20:.0f} MiB | {rss / size:.0%} |"
        )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
