"""GGUF exports in llama.cpp, measured side by side in one run.

Embedded SmolLM2-135M: the full model (its float32 transformers conversion) and two exports at
keep 0.5 from examples/prompt.txt with --multiple-of 32 -- uniform (llama.cpp 'llama') and
protect (per-layer widths, llama.cpp 'deci') -- each converted with `griffin gguf` at f16 and
q8_0. For every file:

* size on disk;
* decode speed in llama.cpp (llama-cpp-python): batch 1, --threads threads, --tokens greedy
  tokens after a short prompt, the files interleaved over --reps rounds (the machine is shared;
  medians are reported);
* perplexity through llama.cpp on --windows windows of wiki-summaries (1024 tokens, every
  position after the first scored), beside `griffin ppl --protocol static` of the same export
  (transformers) on the very same windows.

Usage: python benchmarks/bench_gguf.py [--tokens 128] [--threads 2] [--reps 3] [--windows 8]
       [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from griffin_export import export
from griffin_export.engines.llamacpp import write_gguf
from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.evaluation.ppl import perplexity
from griffin_export.evaluation.protocols import make_windows
from griffin_export.storage.sources import ensure_embedded

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (ROOT / "examples" / "prompt.txt").read_text(encoding="utf-8")
SEQ_LEN = 1024


def open_llama(path: Path, threads: int, n_ctx: int, logits_all: bool = False) -> Llama:
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 1024),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def decode_speed(llm: Llama, prompt: list[int], tokens: int) -> float:
    """Decode tokens/s after ``prompt`` (prefill not timed): ``tokens`` single-token
    ``llama_decode`` calls (batch 1), fed the next tokens of the prompt text in turn -- the cost
    of a decode step does not depend on which token it is (llama-bench's tg test does the
    same, without sampling)."""
    llm.reset()
    llm.eval(prompt[:16])
    feed = [prompt[16 + i % (len(prompt) - 16)] for i in range(tokens)]
    started = time.perf_counter()
    for token in feed:
        llm.eval([token])
    return tokens / (time.perf_counter() - started)


def llama_cpp_ppl(path: Path, windows: list, threads: int) -> float:
    """Perplexity of the windows' scored positions, logits from llama.cpp."""
    llm = open_llama(path, threads, SEQ_LEN, logits_all=True)
    nll, count = 0.0, 0
    try:
        for window in windows:
            ids = window.ids.tolist()
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
            pred = logits[window.score_from - 1 : len(ids) - 1]
            target = np.array(ids[window.score_from :])
            top = pred.max(axis=1, keepdims=True)
            logz = (top[:, 0] + np.log(np.exp(pred - top).sum(axis=1))).astype(np.float64)
            nll += float((logz - pred[np.arange(len(target)), target]).sum())
            count += len(target)
    finally:
        llm.close()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--skip-ppl", action="store_true", help="decode speed and sizes only")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="griffin-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)

    full_dir = ensure_embedded("smollm2-135m")
    dirs = {"full": full_dir}
    for budget in ("uniform", "protect"):
        out = work / f"{budget}-0.5"
        # --multiple-of 32: q8_0 blocks are 32 wide, so every FF tensor quantizes (protect's
        # 713/714-neuron layers would keep their down projections in f16).
        export("smollm2-135m", [PROMPT], 0.5, out=out, budget=budget, multiple_of=32, force=True)
        dirs[budget] = out
    files: dict[tuple[str, str], Path] = {}
    arch: dict[str, str] = {}
    for name, directory in dirs.items():
        for outtype in ("f16", "q8_0"):
            result = write_gguf(directory, work / f"{name}-{outtype}.gguf", outtype, force=True)
            files[(name, outtype)] = result.path
            arch[name] = result.architecture

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(full_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    llms = {key: open_llama(path, args.threads, 512) for key, path in files.items()}
    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in files}
    for _ in range(args.reps):  # interleaved: every file once per round
        for key, llm in llms.items():
            speeds[key].append(decode_speed(llm, prompt_ids, args.tokens))
    for llm in llms.values():
        llm.close()

    corpus = load_corpus("wiki-summaries")
    bos = bos_token(tokenizer)
    span = SEQ_LEN - (bos is not None)
    tokens = corpus_tokens(tokenizer, corpus.text, span * args.windows)
    windows = make_windows(tokens, SEQ_LEN, None, args.windows, 1, bos)
    ppl_llama = {
        name: llama_cpp_ppl(files[(name, "f16")], windows, args.threads)
        for name in dirs
        if not args.skip_ppl
    }
    ppl_griffin: dict[str, float] = {}
    for budget in () if args.skip_ppl else ("uniform", "protect"):
        report = perplexity(str(dirs[budget]), protocol="static", max_windows=args.windows)
        rows = {row.name: row.ppl for row in report.rows}
        ppl_griffin["full"] = rows["full"]
        ppl_griffin[budget] = next(v for k, v in rows.items() if k != "full")

    rows = []
    for (name, outtype), path in files.items():
        rows.append(
            {
                "model": name,
                "arch": arch[name],
                "outtype": outtype,
                "bytes": path.stat().st_size,
                "tok_s": statistics.median(speeds[(name, outtype)]),
                "tok_s_runs": [round(s, 1) for s in speeds[(name, outtype)]],
            }
        )
    full_q8 = statistics.median(speeds[("full", "q8_0")])
    uni = {o: statistics.median(speeds[("uniform", o)]) for o in ("f16", "q8_0")}
    print(f"{'model':8} {'arch':6} {'type':5} {'MB':>7} {'tok/s':>7} {'vs full':>8}")
    for row in rows:
        base = statistics.median(speeds[("full", row["outtype"])])
        print(
            f"{row['model']:8} {row['arch']:6} {row['outtype']:5} {row['bytes'] / 1e6:7.1f} "
            f"{row['tok_s']:7.1f} {row['tok_s'] / base:7.2f}x"
        )
    print(f"uniform q8_0 / full q8_0 decode: {uni['q8_0'] / full_q8:.2f}x (target >= 1.2)")
    for o in ("f16", "q8_0"):
        ratio = statistics.median(speeds[("protect", o)]) / uni[o]
        print(f"protect (deci) / uniform {o} decode: {ratio:.3f} (target >= 0.95)")
    print(f"perplexity, {args.windows} windows of wiki-summaries, L={SEQ_LEN}:")
    for name in ppl_llama:
        a, b = ppl_llama[name], ppl_griffin[name]
        print(
            f"  {name:8} llama.cpp f16 {a:8.3f}  griffin ppl (transformers) {b:8.3f}  "
            f"diff {100 * (a / b - 1):+.2f}%"
        )
    result = {
        "rows": rows,
        "ppl_llama_cpp_f16": ppl_llama,
        "ppl_griffin_static": ppl_griffin,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("work", "out")},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
