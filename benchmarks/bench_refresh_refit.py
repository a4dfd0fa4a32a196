"""Refit at refresh, on and off: decode speed of the runtime and quality, side by side.

Embedded SmolLM2-135M (fp32), default exports (refit, alpha by ratio) from
examples/prompt.txt at each --ratio, batch 1, greedy, --tokens new tokens (EOS ignored).

* **Cost:** :class:`GriffinRuntime` with ``refit_on_refresh`` on and off, refresh every N
  tokens (--refresh, repeatable; window --window), plus refresh off, interleaved over --reps
  repetitions (medians; the machine is shared). Reports decode tok/s and the seconds spent in
  refreshes (the runtime's own ``RefreshEvent.seconds``).
* **Quality:** ``griffin ppl --protocol griffin`` (``evaluate``: windows of --seq-len, the
  first --prompt-len tokens choose the experts and fit the refit, experts re-chosen every N
  scored tokens from the last --window positions) on --dataset, first --max-windows windows:
  refresh with refit on (every segment refits on its look-back), refit off (only the prompt
  part refits; a segment whose experts changed runs the plain slice, as the runtime does),
  and no compensation at all; refresh 0 rows for scale.

Usage: python benchmarks/bench_refresh_refit.py [--ratio 0.5 --ratio 0.75] [--refresh 32
--refresh 64] [--tokens 256] [--reps 3] [--max-windows 8] [--skip-speed] [--skip-quality]
[--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from griffin_export import export
from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import default_alpha
from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.evaluation.ppl import evaluate
from griffin_export.evaluation.protocols import Setting, make_windows
from griffin_export.runtime.refresh import GriffinRuntime
from griffin_export.storage.loading import load_model
from griffin_export.storage.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (ROOT / "examples" / "prompt.txt").read_text(encoding="utf-8")


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode tok/s and refresh seconds of the runtime, refit on/off, per ratio and period."""
    work = Path(tempfile.mkdtemp(prefix="griffin-refit-bench-"))
    runtimes: dict[tuple[float, bool], GriffinRuntime] = {}
    for ratio in args.ratio:
        out = work / f"export-{ratio:g}"
        export("smollm2-135m", [PROMPT], ratio=ratio, out=out)
        for refit in (True, False):
            runtimes[ratio, refit] = GriffinRuntime.from_export(out, refit_on_refresh=refit)
    configs = [(ratio, 0, True) for ratio in args.ratio] + [
        (ratio, period, refit)
        for ratio in args.ratio
        for period in args.refresh
        for refit in (True, False)
    ]
    for runtime in runtimes.values():  # warm-up: maps the original's pages
        runtime.generate(PROMPT, 8, refresh_every=4, window=args.window)
    runs: dict[tuple[float, int, bool], list[tuple[float, float, int]]] = {c: [] for c in configs}
    for _ in range(args.reps):
        for ratio, period, refit in configs:
            stamps: list[float] = []
            result = runtimes[ratio, refit].generate(
                PROMPT,
                args.tokens,
                refresh_every=period,
                window=args.window,
                stop_at_eos=False,
                on_token=lambda _t, stamps=stamps: stamps.append(time.perf_counter()),
            )
            decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
            refresh_s = sum(e.seconds for e in result.refreshes)
            runs[ratio, period, refit].append((decode, refresh_s, len(result.refreshes)))
    rows = []
    for (ratio, period, refit), got in runs.items():
        rows.append(
            {
                "ratio": ratio,
                "refresh": period,
                "refit_on_refresh": refit if period else None,
                "decode_tok_s": statistics.median(r[0] for r in got),
                "decode_runs": [round(r[0], 2) for r in got],
                "refresh_seconds": statistics.median(r[1] for r in got),
                "refreshes": got[0][2],
                "ms_per_refresh": 1000 * statistics.median(r[1] / max(r[2], 1) for r in got),
            }
        )
    return rows


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexities of the refresh protocol, refit on / off / no compensation."""
    loaded = load_model(resolve_source("smollm2-135m"), None, "cpu")
    model, spec = loaded.model, loaded.spec
    corpus = load_corpus(args.dataset)
    bos = bos_token(loaded.tokenizer)
    span = args.seq_len - (bos is not None)
    tokens = corpus_tokens(loaded.tokenizer, corpus.text, span * args.max_windows)
    windows = make_windows(tokens, args.seq_len, None, args.max_windows, args.prompt_len, bos)
    d_ff, n_layers = spec.d_ff(model.config), len(spec.blocks(model))
    settings = [Setting("full", "full")]
    for ratio in args.ratio:
        k = layer_sizes("uniform", n_layers, d_ff, ratio)
        alpha = default_alpha(ratio)
        for period in [0, *args.refresh]:
            variants = [("none", "none", True), ("refit", "refit", True)]
            if period:
                variants.append(("refit, refit off at refresh", "refit", False))
            for label, method, refit in variants:
                settings.append(
                    Setting(
                        f"r={ratio:g} refresh={period} {label}",
                        "griffin",
                        k=k,
                        refresh=period,
                        window=args.window if period else None,
                        compensate=method,
                        alpha=alpha,
                        refit_on_refresh=refit,
                    )
                )
    report = evaluate(
        [(model, spec, s) for s in settings],
        windows,
        dataset=corpus.name,
        protocol="griffin",
        prompt_len=args.prompt_len,
        on_window=lambda done: print(f"window {done}/{len(windows)}", flush=True),
    )
    return report.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, action="append")
    parser.add_argument("--refresh", type=int, action="append")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dataset", default="wiki-summaries")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    args.ratio = args.ratio or [0.5, 0.75]
    args.refresh = args.refresh or [32, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "torch_threads": torch.get_num_threads(),
    }
    if not args.skip_speed:
        result["speed"] = speed(args)
        for row in result["speed"]:
            print(json.dumps(row))
    if not args.skip_quality:
        result["quality"] = quality(args)
        for row in result["quality"]["results"]:
            print(f"{row['name']:<45} {row['ppl']:8.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
