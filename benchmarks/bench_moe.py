"""Mixture-of-experts export at a real model's layout, scaled down: bytes, export time against a
copy, peak memory against depth, and decode speed of the export against the full model.

A synthetic Qwen3-MoE checkpoint (random bf16 weights, per-expert tensors as save_pretrained
writes them) is built once per depth under --work (default: a folder in the system temp
directory). Default shape: Qwen3-30B-A3B's layout scaled down -- 128 routed experts of width
384, top-8, hidden 1024 -- at 4 and 8 layers (``--depths``, ``--experts``, ``--width``,
``--top-k``, ``--hidden`` change it). Two parts:

``export`` -- every run a fresh subprocess (wall time and peak RSS from the kernel's rusage,
as in bench_streaming.py), into a fresh output directory after a sync, ``--reps`` times
interleaved, at every depth:

  copy       load every source shard with safetensors and save it again
  streaming  griffin export --experts 0.25 --ratio 0.5 (the default path)
  in-memory  the same export with --in-memory

with the growth of the peak RSS from the shallowest to the deepest model against the
checkpoint bytes the added layers bring (streaming should be flat in depth).

``decode`` -- the deepest model and its streaming export, batch 1, greedy, ``--new-tokens``
tokens after a short prompt, all configurations interleaved over ``--decode-reps`` rounds
(medians): transformers generate() (bf16, ``--threads`` torch threads), and llama.cpp
(llama-cpp-python, ``--threads`` threads) on both converted with `griffin gguf` at
``--outtype``. A conversion that fails is reported with its error; the rest still runs.

Usage: python benchmarks/bench_moe.py [--part export|decode|all] [--depths 4,8] [--reps 1]
       [--tokens 512] [--new-tokens 32] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bench_streaming import COPY, IN_MEMORY, STREAMING, copy_streaming_in_memory, emit, run_all

ROOT = Path(__file__).resolve().parents[1]


def source_dir(args: argparse.Namespace, layers: int) -> Path:
    """The synthetic checkpoint of ``layers`` layers under ``--work``."""
    shape = f"{layers}x{args.experts}-top{args.top_k}-h{args.hidden}-w{args.width}"
    return args.work / f"qwen3moe-{shape}"


def build(directory: Path, args: argparse.Namespace, layers: int) -> int:
    """Write the synthetic checkpoint unless it exists; return its weight bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from griffin_export.storage.sources import resolve_source

    if not (directory / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").directory)
        config = Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim: a PretrainedConfig kwarg
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            moe_intermediate_size=args.width,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=args.hidden // 16,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(directory, max_shard_size="1GB")
        tokenizer.save_pretrained(directory)
        del model
    return weight_bytes(directory)


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def export_part(args: argparse.Namespace, prompt: Path) -> str:
    """Copy / streaming / in-memory at every depth, and the growth in depth (Markdown)."""
    griffin = [str(Path(sys.executable).parent / "griffin"), "export"]
    sizes: dict[int, int] = {}
    runs: dict[tuple[str, int], tuple[list[str], Path]] = {}
    for layers in args.depths:
        source = source_dir(args, layers)
        sizes[layers] = build(source, args, layers)
        common = [
            *griffin,
            *("--model", str(source), "--prompt", str(prompt)),
            *("--max-prompt-tokens", str(args.tokens), "--experts", "0.25", "--ratio", "0.5"),
            "--force",
        ]
        for name, run in copy_streaming_in_memory(source, common, args.work / f"{layers}l").items():
            runs[(name, layers)] = run
    seen = run_all(runs, args.reps)
    for layers in args.depths:  # the copies are as large as the checkpoints
        shutil.rmtree(args.work / f"{layers}l" / "copy", ignore_errors=True)
    wall = {key: statistics.median(s for s, _ in v) for key, v in seen.items()}
    peak = {key: statistics.median(r for _, r in v) for key, v in seen.items()}
    out_bytes = {
        (name, layers): weight_bytes(output)
        for (name, layers), (_, output) in runs.items()
        if name != COPY
    }
    lines = [
        f"Synthetic Qwen3-MoE, {args.experts} experts x width {args.width}, top-{args.top_k}, "
        f"hidden {args.hidden}, bf16, at {' and '.join(map(str, args.depths))} layers; "
        f"{args.tokens}-token prompt, --experts 0.25 --ratio 0.5 (refit); {args.reps} rep(s), "
        f"interleaved; torch {torch.__version__}, {os.cpu_count()} CPUs",
        "",
        "| layers | run | source MB | output MB | wall s (median) | all runs | vs copy | "
        "peak RSS (median) | all runs (MiB) | RSS / source bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layers in args.depths:
        for name in (COPY, STREAMING, IN_MEMORY):
            key = (name, layers)
            output = f"{out_bytes[key] / 1e6:.0f}" if key in out_bytes else "(same)"
            walls = ", ".join(f"{t:.1f}" for t, _ in seen[key])
            peaks = ", ".join(f"{r / 2**20:.0f}" for _, r in seen[key])
            lines.append(
                f"| {layers} | {name} | {sizes[layers] / 1e6:.0f} | {output} | {wall[key]:.1f} | "
                f"{walls} | {wall[key] / wall[(COPY, layers)]:.2f}x | {peak[key] / 2**20:.0f} MiB "
                f"| {peaks} | {peak[key] / sizes[layers]:.0%} |"
            )
    few, many = min(args.depths), max(args.depths)
    added = sizes[many] - sizes[few]
    lines += [
        "",
        f"Growth of the median peak RSS from {few} to {many} layers, against the checkpoint "
        f"bytes the added layers bring ({added / 2**20:.0f} MiB):",
    ]
    for name in (STREAMING, IN_MEMORY):
        growth = peak[(name, many)] - peak[(name, few)]
        lines.append(
            f"- {name}: {growth / 2**20:+.0f} MiB, {growth / added:+.1%} of the added bytes"
        )
    return "\n".join(lines)


def decode_part(args: argparse.Namespace) -> str:
    """Decode tokens/s of the deepest model and its streaming export, in transformers and in
    llama.cpp, interleaved (Markdown)."""
    from bench_decode import hf_generate
    from bench_gguf import PROMPT, decode_speed, open_llama
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from griffin_export.engines.llamacpp import write_gguf

    layers = max(args.depths)
    dirs = {"full": source_dir(args, layers), "export": args.work / f"{layers}l" / "s"}
    if not (dirs["export"] / "config.json").is_file():
        raise SystemExit(f"{dirs['export']} missing: run --part export first")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(dirs["full"])
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids[: args.prompt_tokens]])
    n = args.new_tokens
    configs: dict[str, Callable[[], float]] = {}
    failures = []

    def transformers(model: object) -> Callable[[], float]:
        run = hf_generate(model, ids, n)
        return lambda: run().speeds()[1]  # decode tok/s: after the first token

    def llama_cpp(llm: Llama) -> Callable[[], float]:
        return lambda: decode_speed(llm, prompt_ids, n)

    for name, directory in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
        configs[f"transformers bf16, {name}"] = transformers(model)
    gguf_bytes = {}
    for name, directory in dirs.items():
        path = args.work / f"{layers}l-{name}-{args.outtype}.gguf"
        try:
            write_gguf(directory, path, args.outtype, force=True)
        except Exception as error:  # the report names it; the rest still runs
            failures.append(f"- `griffin gguf` of the {name} model failed: {error}")
            continue
        gguf_bytes[name] = path.stat().st_size
        configs[f"llama.cpp {args.outtype}, {name}"] = llama_cpp(
            open_llama(path, args.threads, 512)
        )
    for run in configs.values():  # warm-up: first-touch of mapped weights, allocator
        run()
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.decode_reps):
        for name, run in configs.items():
            speeds[name].append(run())
    median = {name: statistics.median(v) for name, v in speeds.items()}
    lines = [
        f"Decode, {layers} layers: batch 1, greedy, {n} new tokens after a "
        f"{ids.shape[1]}-token prompt (llama.cpp: {n} single-token decodes after a 16-token "
        f"prefill), {args.threads} threads, {args.decode_reps} interleaved rounds (median); "
        f"GGUF sizes: "
        + ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in gguf_bytes.items()),
        "",
        "| engine, model | decode tok/s (median) | all runs | export / full |",
        "|---|---|---|---|",
    ]
    for name in configs:
        full = name.replace("export", "full")
        ratio = f"{median[name] / median[full]:.2f}x" if "export" in name and full in median else ""
        runs = ", ".join(f"{v:.1f}" for v in speeds[name])
        lines.append(f"| {name} | {median[name]:.1f} | {runs} | {ratio} |")
    return "\n".join([*lines, *(["", *failures] if failures else [])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "griffin-moe")
    parser.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    parser.add_argument("--part", choices=("export", "decode", "all"), default="all")
    parser.add_argument("--reps", type=int, default=1, help="interleaved export repetitions")
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens of the export")
    parser.add_argument("--depths", default="4,8", help="layer counts, comma-separated")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="decode prompt tokens")
    parser.add_argument("--decode-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--outtype", default="q8_0", help="GGUF type of both models")
    args = parser.parse_args()
    args.depths = sorted(int(d) for d in args.depths.split(","))
    from griffin_export.evaluation.corpora import load_corpus

    args.work.mkdir(parents=True, exist_ok=True)
    prompt = args.work / "prompt.txt"
    prompt.write_text(load_corpus("wiki-summaries").text[:20000], encoding="utf-8")
    parts = []
    if args.part in ("export", "all"):
        parts.append(export_part(args, prompt))
    if args.part in ("decode", "all"):
        parts.append(decode_part(args))
    emit("\n\n".join(parts), args.out)


if __name__ == "__main__":
    main()
