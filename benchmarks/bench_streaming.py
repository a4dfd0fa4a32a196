"""Streaming export against the in-memory path and a plain read-once-write-once copy.

Builds (once) a synthetic Llama-architecture checkpoint of ~3.7 GB (random bf16 weights,
hidden 2048, d_ff 5632, 32 layers, vocab 49152, untied head, 1 GB shards) under --work
(default: a folder in the system temp directory; never inside the repository), then measures
in one run, each in a fresh subprocess (wall time and peak RSS from the kernel's rusage),
--reps times interleaved, each run into a fresh output directory after a sync:

  copy       load every source shard with safetensors and save it again (read once, write once)
  streaming  griffin export --ratio 0.5 with a 512-token prompt (the default path)
  in-memory  the same export with --in-memory

Usage: python benchmarks/bench_streaming.py [--work DIR] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden": 2048, "d_ff": 5632, "layers": 32, "vocab": 49152, "heads": 16}


def build(directory: Path) -> int:
    """Write the synthetic checkpoint (tensor by tensor) unless it exists; return its bytes."""
    from transformers import AutoTokenizer, LlamaConfig

    from griffin_export.storage.safetensors_io import ShardWriter
    from griffin_export.storage.sources import resolve_source

    done = directory / "config.json"
    if not done.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        h, f, v = SHAPE["hidden"], SHAPE["d_ff"], SHAPE["vocab"]
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(SHAPE["layers"]):
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
            num_hidden_layers=SHAPE["layers"],
            num_attention_heads=SHAPE["heads"],
            num_key_value_heads=SHAPE["heads"],
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ).save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


COPY = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
"""


def measure(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of one subprocess, from the kernel's rusage of exactly
    that child (``wait4``; Linux reports ``ru_maxrss`` in KiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[:3]} failed")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "griffin-bench")
    parser.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    args = parser.parse_args()
    source = args.work / "synthetic-llama"
    size = build(source)
    from griffin_export.evaluation.corpora import load_corpus

    prompt = args.work / "prompt.txt"
    prompt.write_text(load_corpus("wiki-summaries").text[:6000], encoding="utf-8")
    griffin = [str(Path(sys.executable).parent / "griffin"), "export", "--model", str(source)]
    common = ["--prompt", str(prompt), "--max-prompt-tokens", "512", "--ratio", "0.5", "--force"]
    runs = {
        "copy (read once, write once)": (
            [sys.executable, "-c", COPY, str(source), str(args.work / "copy")],
            args.work / "copy",
        ),
        "griffin export (streaming)": (
            [*griffin, *common, "--out", str(args.work / "s")],
            args.work / "s",
        ),
        "griffin export --in-memory": (
            [*griffin, *common, "--in-memory", "--out", str(args.work / "m")],
            args.work / "m",
        ),
    }
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (command, output) in runs.items():
            shutil.rmtree(output, ignore_errors=True)  # every run writes a fresh directory
            os.sync()  # and starts with no dirty pages of the previous one
            seen[name].append(measure(command))
    rows = {
        name: (statistics.median(s for s, _ in v), max(r for _, r in v)) for name, v in seen.items()
    }
    base = rows["copy (read once, write once)"][0]
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
    report = "\n".join(lines)
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
