"""Decode speed of the refresh runtime against the full model, measured side by side.

Embedded SmolLM2-135M (fp32), an export at --ratio (default 0.5) from examples/prompt.txt,
batch 1, greedy, --tokens new tokens (default 256, EOS ignored). Configurations, interleaved
over --reps repetitions (the machine is shared and noisy; medians are reported):

  (a)  the full model in griffin's own decode loop (runtime.decode)     <- the reference
  (a') the full model under plain transformers generate()
  (a*) the full model with the runtime's column-major gate/up weights (how much of (c)'s
       gain is that layout rather than pruning)
  (b)  the export under plain transformers generate()
  (c)  the runtime, refresh off
  (d)  the runtime, refresh every 64 tokens (window 128)

Memory is measured in a separate process that only loads the runtime and generates with
refresh 64: VmHWM, anonymous and file-backed RSS, and the bytes of the mapped original.

Usage: python benchmarks/bench_decode.py [--tokens 256] [--reps 3] [--ratio 0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from griffin_export import export
from griffin_export.runtime.refresh import GriffinRuntime, decode
from griffin_export.storage.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (ROOT / "examples" / "prompt.txt").read_text(encoding="utf-8")

MEMORY_PROBE = """
import json, sys, torch
from griffin_export.runtime.refresh import GriffinRuntime
rt = GriffinRuntime.from_export(sys.argv[1])
rt.generate(sys.argv[2], int(sys.argv[3]), refresh_every=64, window=128, stop_at_eos=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status[key].split()[0]) * 1024
pruned = sum(p.numel() * p.element_size() for p in rt.model.parameters())
print(json.dumps({"VmHWM": kb("VmHWM"), "RssAnon": kb("RssAnon"), "RssFile": kb("RssFile"),
                  "pruned_param_bytes": pruned, "mapped_original_bytes": rt.original.mapped_bytes}))
"""


class Clock:
    """Times one generation: the start, the first token and the last one."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def token(self, *_: object) -> None:
        self.stamps.append(time.perf_counter())

    def speeds(self) -> tuple[float, float]:
        """(end-to-end tok/s incl. prefill, decode tok/s after the first token)."""
        n, first, last = len(self.stamps), self.stamps[0], self.stamps[-1]
        return n / (last - self.start), (n - 1) / (last - first)


class StreamClock(Clock):
    """The same clock as a transformers streamer (its first put() is the prompt)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.token()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def hf_generate(model: Any, ids: torch.Tensor, n: int) -> Callable[[], Clock]:
    """A run of ``n`` greedy tokens after ``ids`` under plain transformers generate() (EOS
    ignored), returning its clock."""

    def run() -> Clock:
        clock = StreamClock()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                streamer=clock,
            )
        return clock

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error(
            f"--tokens must be at least 2 (decode speed needs tokens after the first), "
            f"got {args.tokens}"
        )
    torch.manual_seed(0)

    work = Path(tempfile.mkdtemp(prefix="griffin-bench-"))
    out = work / "export"
    export("smollm2-135m", [PROMPT], ratio=args.ratio, out=out)
    full = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m").directory).eval()
    full_column_major = AutoModelForCausalLM.from_pretrained(
        resolve_source("smollm2-135m").directory
    ).eval()
    for layer in full_column_major.model.layers:  # the runtime's layout, on the full model
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
            linear.weight = torch.nn.Parameter(linear.weight.detach().T.contiguous().T)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    runtime = GriffinRuntime.from_export(out)
    ids = runtime.tokenizer(PROMPT, return_tensors="pt").input_ids
    n = args.tokens

    def own_loop(model):  # type: ignore[no-untyped-def]
        def run() -> Clock:
            clock = Clock()
            decode(model, ids, n, lambda logits: int(logits.argmax()), on_token=clock.token)
            return clock

        return run

    def runtime_run(refresh: int):  # type: ignore[no-untyped-def]
        def run() -> Clock:
            clock = Clock()
            runtime.generate(
                PROMPT,
                n,
                refresh_every=refresh,
                window=128,
                stop_at_eos=False,
                on_token=clock.token,
            )
            return clock

        return run

    configs = {
        "(a) full, griffin decode loop": own_loop(full),
        "(a') full, HF generate": hf_generate(full, ids, n),
        "(a*) full, runtime's column-major gate/up": own_loop(full_column_major),
        "(b) export, HF generate": hf_generate(pruned, ids, n),
        "(c) runtime, refresh off": runtime_run(0),
        "(d) runtime, refresh 64": runtime_run(64),
    }
    decode(full, ids, 8, lambda logits: int(logits.argmax()))  # warm-up
    runtime.generate(PROMPT, 8, refresh_every=4, window=128)  # maps the original's pages
    e2e: dict[str, list[float]] = {name: [] for name in configs}
    dec: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.reps):
        for name, fn in configs.items():
            clock = fn()
            if len(clock.stamps) != n:
                raise SystemExit(f"{name}: {len(clock.stamps)} tokens, expected {n}")
            total, decoding = clock.speeds()
            e2e[name].append(total)
            dec[name].append(decoding)
    med_e2e = {name: statistics.median(v) for name, v in e2e.items()}
    med_dec = {name: statistics.median(v) for name, v in dec.items()}
    base_e2e, base_dec = (
        med_e2e["(a) full, griffin decode loop"],
        med_dec["(a) full, griffin decode loop"],
    )

    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(out), PROMPT, str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    memory = json.loads(probe.stdout.strip().splitlines()[-1])

    lines = [
        f"SmolLM2-135M fp32, keep {args.ratio}, batch 1, {ids.shape[1]}-token prompt, {n} new "
        f"tokens, {args.reps} interleaved repetitions (median), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Decode = tokens after the first / time after the "
        "first; end-to-end includes the prefill (and, for (c) and (d) only, tokenizing the "
        "prompt).",
        "",
        "| configuration | decode tok/s | all runs | vs (a) | end-to-end tok/s | vs (a) |",
        "|---|---|---|---|---|---|",
    ]
    for name in configs:
        runs = ", ".join(f"{v:.1f}" for v in dec[name])
        lines.append(
            f"| {name} | {med_dec[name]:.1f} | {runs} | {med_dec[name] / base_dec:.2f}x "
            f"| {med_e2e[name]:.1f} | {med_e2e[name] / base_e2e:.2f}x |"
        )
    c, d = med_dec["(c) runtime, refresh off"], med_dec["(d) runtime, refresh 64"]
    c_star = med_dec["(a*) full, runtime's column-major gate/up"]
    lines += [
        "",
        f"(c)/(a) = {c / base_dec:.3f}; (c)/(a*) = {c / c_star:.3f} (pruning alone, same "
        "layout); (d)/(c) = "
        f"{d / c:.3f} (cost of refreshing every 64 tokens)",
        "",
        "Memory of a process holding only the runtime (refresh 64, same generation):",
        "",
        f"- pruned model parameters: {memory['pruned_param_bytes'] / 2**20:.1f} MiB",
        f"- peak RSS (VmHWM): {memory['VmHWM'] / 2**20:.1f} MiB; anonymous RSS "
        f"{memory['RssAnon'] / 2**20:.1f} MiB, file-backed RSS {memory['RssFile'] / 2**20:.1f} MiB",
        "- original mapped (not read unless touched): "
        f"{memory['mapped_original_bytes'] / 2**20:.1f} MiB",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
