"""Ablation of compensation (issue 16) under the ``griffin`` perplexity protocol.

As ``griffin ppl --protocol griffin`` (docs/design.md, "Perplexity protocols"): per L-token window
the first P run through the full model; every layer's experts (and, with compensation, its
refitted down projection) come from those P positions; positions P..L-1 run with the pruned
FF blocks and are scored (the first of them predicted from position P-1, unpruned, as in
``evaluate.window_nll``).

The model is loaded once. Per window the prefix runs once (KV cache kept, every layer's
down-projection inputs captured and their Gram matrices accumulated with
:class:`griffin_export.core.compensation.GramStats`); per setting only the L-P suffix runs, with
every down projection's weight replaced by what the export would write: the kept columns
(plain or refitted with :func:`~griffin_export.core.compensation.apply_regression`) at
their places and zeros at the dropped ones -- a zero column is exactly a sliced-away neuron --
plus the refit's bias where the setting has one.

Setting names ``<selection>/<budget>/<compensation>``:

* selection: ``griffin`` (the statistic s_j), ``wnorm`` (s_j * ||W_down[:, j]||: a neuron's
  share of the prompt's activation energy times the size of what it writes), ``obs`` (greedy
  backward elimination on the prompt's Gram matrix, Optimal-Brain-Surgeon style: drop the
  neuron whose removal, with the others refitted, costs the least output error
  ``||W_:,j||^2 / [(G + lam I)^-1]_jj``, downdating the inverse; ``lam`` from ``@<a>``),
  ``@<n>`` after it takes only the last n prompt tokens for selection and refit;
* budget: ``uniform`` or ``protect`` (:func:`griffin_export.core.budgets.layer_sizes`);
* compensation: ``none``, ``refit:<alpha>``, ``refit-bias:<alpha>``, or ``mean`` (the dropped
  neurons' prompt mean folded into a bias; "bias only").

Usage:
    .venv/bin/python benchmarks/ablation_compensation.py --dataset wiki-summaries \
        --ratio 0.5 --settings griffin/uniform/none,griffin/uniform/refit:1 --out x.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation_setup import add_window_args, load_windows  # noqa: E402  (benchmarks/)

from griffin_export.core.budgets import layer_sizes  # noqa: E402
from griffin_export.core.compensation import GramStats, apply_regression  # noqa: E402
from griffin_export.core.scoring import griffin_statistic, top_k_indices  # noqa: E402


@dataclass(frozen=True)
class Parsed:
    name: str
    select: str
    budget: str
    method: str
    alpha: float
    obs_alpha: float
    last: int | None


def parse_setting(name: str) -> Parsed:
    select, budget, comp = name.split("/")
    select, _, last = select.partition("@")
    obs_alpha = 1.0
    if select.startswith("obs") and select != "obs":
        obs_alpha = float(select[3:])
        select = "obs"
    method, _, alpha = comp.partition(":")
    if select not in ("griffin", "wnorm", "obs") or method not in (
        "none",
        "refit",
        "refit-bias",
        "mean",
    ):
        raise SystemExit(f"unknown setting {name!r}")
    return Parsed(
        name, select, budget, method, float(alpha or 1.0), obs_alpha, int(last) if last else None
    )


def obs_keep(gram: Tensor, w: Tensor, k: int, alpha: float, step: int = 16) -> Tensor:
    """Greedy backward elimination: repeatedly drop the ``step`` neurons with the smallest
    ``||W_:,j||^2 / [H^-1]_jj`` (``H = G + lam I``), downdating ``H^-1`` and the weights
    (the others' optimal compensation) after each step. Returns the kept indices, sorted."""
    d = gram.shape[0]
    lam = alpha * float(gram.diagonal().mean())
    h_inv = torch.cholesky_inverse(
        torch.linalg.cholesky(gram + lam * torch.eye(d, dtype=gram.dtype))
    )
    w = w.double().clone()
    alive = torch.arange(d)
    while alive.numel() > k:
        n = min(step, alive.numel() - k)
        cost = w.square().sum(0) / h_inv.diagonal()
        drop = torch.sort(cost, stable=True).indices[:n]
        stay = torch.ones(alive.numel(), dtype=torch.bool)
        stay[drop] = False
        # Compensate the others for the dropped ones: W_K -= W_R (H^-1_RR)^-1 H^-1_RK.
        block = h_inv[drop][:, drop]
        cross = h_inv[drop][:, stay]
        solve = torch.linalg.solve(block, cross)  # [n, |K|]
        w = w[:, stay] - w[:, drop] @ solve
        h_inv = h_inv[stay][:, stay] - cross.T @ solve
        alive = alive[stay]
    return torch.sort(alive).values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, action="append", required=True)
    ap.add_argument("--settings", required=True)
    add_window_args(ap)
    ap.add_argument(
        "--refresh",
        type=int,
        default=None,
        help="run the settings through evaluate.evaluate (griffin ppl's own code path, one "
        "masked forward per window) with this refresh period (0 = none); griffin selection only",
    )
    ap.add_argument("--window", type=int, default=None, help="with --refresh: look-back window")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = time.perf_counter()

    loaded, windows = load_windows(args.model, args)
    model, spec = loaded.model, loaded.spec
    L, P = args.seq_len, args.prompt_len
    blocks = spec.blocks(model)
    n_layers = len(blocks)
    d_ff = spec.d_ff(model.config)
    downs = [spec.down_module(b) for b in blocks]
    # [out, in] view of every down weight (Conv1D stores [in, out]).
    full_w = [d.weight.detach().clone() for d in downs]
    out_in = [w.T if spec.transposed else w for w in full_w]
    full_b = [None if getattr(d, "bias", None) is None else d.bias.detach().clone() for d in downs]
    col_norms = [torch.linalg.vector_norm(w.float(), dim=0) for w in out_in]
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    if args.refresh is not None:
        run_evaluate(args, model, spec, windows, settings, n_layers, d_ff, started)
        return
    nll: dict[str, float] = {}
    count: dict[str, int] = {}
    for param in model.parameters():
        param.requires_grad_(False)

    for w_i, window in enumerate(windows):
        ids = window.ids.reshape(1, -1)
        captured: list[Tensor] = [torch.empty(0)] * n_layers
        handles = []
        for i, down in enumerate(downs):

            def grab(
                _m: torch.nn.Module,
                a: tuple[Tensor, ...],
                i: int = i,
                captured: list[Tensor] = captured,
            ) -> None:
                captured[i] = a[0][0].detach().float().clone()  # [P, d_ff]

            handles.append(down.register_forward_pre_hook(grab))
        with torch.inference_mode():
            out = model(input_ids=ids[:, :P], use_cache=True, logits_to_keep=1)
        for h in handles:
            h.remove()
        cache = out.past_key_values
        t_prefix = time.perf_counter()
        first_logit = out.logits[0, -1].float()
        grams: dict[int | None, list[GramStats]] = {}
        scores: dict[int | None, list[Tensor]] = {}
        for last in {st.last for st in settings}:
            zs = [z if last is None else z[-last:] for z in captured]
            grams[last] = []
            for z in zs:
                g = GramStats.zeros(d_ff)
                g.add(z)
                grams[last].append(g)
            scores[last] = [griffin_statistic(z) for z in zs]

        t_gram = time.perf_counter()
        print(f"prefix {t_prefix - started:.0f}s grams {t_gram - t_prefix:.1f}s", flush=True)
        for ratio in args.ratio:
            for st in settings:
                t0 = time.perf_counter()
                key = f"r={ratio:g} {st.name}"
                ks = layer_sizes(st.budget, n_layers, d_ff, ratio)
                for layer, down in enumerate(downs):
                    stats, s = grams[st.last][layer], scores[st.last][layer]
                    k = ks[layer]
                    if k == d_ff:
                        keep = torch.arange(d_ff)
                    elif st.select == "griffin":
                        keep = top_k_indices(s, k)
                    elif st.select == "wnorm":
                        keep = top_k_indices(s * col_norms[layer], k)
                    else:
                        keep = obs_keep(stats.matrix().double(), out_in[layer], k, st.obs_alpha)
                    w = out_in[layer]
                    new_w = torch.zeros_like(w)
                    extra: Tensor | None = None
                    if st.method == "none":
                        new_w[:, keep] = w[:, keep]
                    elif st.method == "mean":
                        new_w[:, keep] = w[:, keep]
                        dropped = torch.ones(d_ff, dtype=torch.bool)
                        dropped[keep] = False
                        extra = (w.double()[:, dropped] @ (stats.sums[dropped] / stats.tokens)).to(
                            w.dtype
                        )
                    else:
                        reg = stats.regression(keep, st.alpha, st.method == "refit-bias")
                        refit = apply_regression(reg, w)
                        new_w[:, keep] = refit.weight
                        extra = refit.bias
                    down.weight.data = new_w.T.contiguous() if spec.transposed else new_w
                    if extra is not None:
                        base = full_b[layer]
                        down.bias = torch.nn.Parameter(
                            extra if base is None else base + extra, requires_grad=False
                        )
                t1 = time.perf_counter()
                with torch.inference_mode():
                    logits = (
                        model(input_ids=ids[:, P:], past_key_values=cache, use_cache=True)
                        .logits[0]
                        .float()
                    )
                cache.crop(-(ids.shape[1] - P))
                print(f"  {key}: weights {t1 - t0:.1f}s forward {time.perf_counter() - t1:.1f}s")
                for layer, down in enumerate(downs):  # restore the full model
                    down.weight.data = full_w[layer]
                    base = full_b[layer]
                    down.bias = None if base is None else torch.nn.Parameter(base, False)
                pred = torch.cat([first_logit[None], logits[:-1]])
                loss = torch.nn.functional.cross_entropy(pred, ids[0, P:], reduction="sum")
                nll[key] = nll.get(key, 0.0) + float(loss)
                count[key] = count.get(key, 0) + int(ids.shape[1] - P)
        # the full model on the same tokens
        with torch.inference_mode():
            logits = model(input_ids=ids[:, P:], past_key_values=cache, use_cache=True).logits
        cache.crop(-(ids.shape[1] - P))
        pred = torch.cat([first_logit[None], logits[0, :-1].float()])
        loss = torch.nn.functional.cross_entropy(pred, ids[0, P:], reduction="sum")
        nll["full"] = nll.get("full", 0.0) + float(loss)
        count["full"] = count.get("full", 0) + int(ids.shape[1] - P)
        done = {key: math.exp(nll[key] / count[key]) for key in nll}
        print(
            f"window {w_i + 1}/{len(windows)} {time.perf_counter() - started:.0f}s "
            + " ".join(f"{key}={v:.2f}" for key, v in done.items()),
            flush=True,
        )
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "seq_len": L,
        "prompt_len": P,
        "windows": len(windows),
        "tokens_scored": count["full"],
        "seconds": round(time.perf_counter() - started, 1),
        "ppl": {key: math.exp(nll[key] / count[key]) for key in nll},
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def run_evaluate(
    args: argparse.Namespace,
    model: torch.nn.Module,
    spec: object,
    windows: list,
    settings: list[Parsed],
    n_layers: int,
    d_ff: int,
    started: float,
) -> None:
    """The settings through ``ppl.evaluate`` (``griffin ppl --protocol griffin``'s code):
    refit from each segment's look-back positions, refresh every ``--refresh`` positions."""
    from griffin_export.evaluation.ppl import evaluate
    from griffin_export.evaluation.protocols import Setting

    runs = [(model, spec, Setting("full", "full"))]
    for ratio in args.ratio:
        for st in settings:
            if st.select != "griffin" or st.method == "mean" or st.last is not None:
                raise SystemExit(f"{st.name}: --refresh supports griffin/<budget>/<none|refit>")
            name = f"r={ratio:g} {st.name} refresh={args.refresh} window={args.window}"
            runs.append(
                (
                    model,
                    spec,
                    Setting(
                        name,
                        "griffin",
                        k=layer_sizes(st.budget, n_layers, d_ff, ratio),
                        refresh=args.refresh,
                        window=args.window,
                        compensate=st.method,
                        alpha=st.alpha,
                    ),
                )
            )
    report = evaluate(
        runs,  # type: ignore[arg-type]
        windows,
        dataset=args.dataset,
        protocol="griffin",
        prompt_len=args.prompt_len,
        on_window=lambda done: print(f"window {done} {time.perf_counter() - started:.0f}s"),
    )
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "seq_len": args.seq_len,
        "prompt_len": args.prompt_len,
        "windows": report.windows,
        "tokens_scored": report.tokens_scored,
        "seconds": round(time.perf_counter() - started, 1),
        "ppl": {row.name: row.ppl for row in report.rows},
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result["ppl"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
