"""Probe: a sequential (error-propagation-aware) refit against the export's refit.

Same protocol and accounting as ``benchmarks/ablation_compensation.py`` (``griffin`` protocol:
per window of L tokens the first P run through the full model, choose every layer's experts
(GRIFFIN statistic, uniform k) and fit the repair; positions P..L-1 run pruned and are scored,
continuing the full model's KV cache of the prompt). Settings per ratio:

* ``none``: the plain slice;
* ``refit:<a>``: the export's refit (``griffin_export.core.compensation``): ridge on the *full*
  model's down inputs ``Z`` of the prompt, target ``Y = Z W^T``;
* ``seq:<a>``: the same target ``Y`` (the full model's layer output on the prompt), but the
  regressors are the kept activations ``Z~_S`` that the *pruned and already refitted* model
  computes at that layer on the prompt (layers refitted bottom-up in one forward: each down
  projection's pre-hook fits its own weights before it runs):
  ``W'^T = (Z~_S^T Z~_S + lam I)^-1 (Z~_S^T Y + lam W_S^T)``,
  ``lam = a * mean(diag(Z~_S^T Z~_S))``. Each layer thus also repairs what the layers below
  it lost. Same shapes (stock-loadable); one k x k solve per layer plus one extra forward of
  the prompt.
* ``seqself:<a>``: bottom-up as ``seq``, but the target is the layer's own full output on the
  pruned model's inputs (``Y~ = Z~ W^T``, SparseGPT's choice): the export's refit, fitted on
  the activations the pruned model will actually see.

Usage: python benchmarks/ablation_sequential_refit.py --ratio 0.5 [--ratio 0.75]
       [--dataset wiki-summaries] [--max-windows 8] [--settings none,refit:1,seq:1] --out F
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from ablation_setup import add_window_args, load_windows  # benchmarks/, beside this script
from torch import Tensor

from griffin_export.core.budgets import layer_sizes
from griffin_export.core.compensation import GramStats, apply_regression, default_alpha
from griffin_export.core.scoring import griffin_statistic, top_k_indices


def sequential_weights(
    model: torch.nn.Module,
    downs: list[torch.nn.Module],
    prefix: Tensor,
    targets: list[Tensor],
    keeps: list[Tensor],
    full_w: list[Tensor],
    alpha: float,
    own_target: bool = False,
) -> list[Tensor]:
    """Bottom-up refit on the pruned model's own prompt activations (see the module doc);
    ``own_target``: the target is the layer's full output on those activations."""
    fitted: list[Tensor] = []
    handles = []
    for layer, down in enumerate(downs):

        def fit(_m: torch.nn.Module, a: tuple[Tensor, ...], layer: int = layer) -> None:
            keep, w = keeps[layer], full_w[layer]
            zs = a[0][0][:, keep].double()  # [P, k]: the pruned model's kept activations
            gram = zs.T @ zs
            lam = alpha * float(gram.diagonal().mean())
            system = gram + lam * torch.eye(keep.numel(), dtype=gram.dtype)
            target = a[0][0].double() @ w.double().T if own_target else targets[layer]
            rhs = zs.T @ target + lam * w[:, keep].double().T
            new = torch.zeros_like(w)
            new[:, keep] = torch.linalg.solve(system, rhs).T.to(w.dtype)
            _m.weight.data = new  # type: ignore[union-attr]
            fitted.append(new)

        handles.append(down.register_forward_pre_hook(fit))
    try:
        with torch.inference_mode():
            model(input_ids=prefix, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return fitted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, action="append", required=True)
    ap.add_argument("--settings", default="none,refit,seq")
    add_window_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = time.perf_counter()
    loaded, windows = load_windows("smollm2-135m", args, with_bos=True)
    model, spec = loaded.model, loaded.spec
    if spec.transposed:
        raise SystemExit("this probe handles [out, in] down weights only")
    big_l, p = args.seq_len, args.prompt_len
    downs = [spec.down_module(b) for b in spec.blocks(model)]
    full_w = [d.weight.detach().clone() for d in downs]
    d_ff, n_layers = full_w[0].shape[1], len(downs)
    nll: dict[str, float] = {}
    count = 0
    for w_i, window in enumerate(windows):
        ids = window.ids.reshape(1, -1)
        captured: list[Tensor] = [torch.empty(0)] * n_layers
        handles = [
            down.register_forward_pre_hook(
                lambda _m, a, i=i, c=captured: c.__setitem__(i, a[0][0].detach().float().clone())
            )
            for i, down in enumerate(downs)
        ]
        with torch.inference_mode():
            out = model(input_ids=ids[:, :p], use_cache=True, logits_to_keep=1)
        for handle in handles:
            handle.remove()
        cache, first = out.past_key_values, out.logits[0, -1].float()
        targets = [(z.double() @ w.double().T) for z, w in zip(captured, full_w, strict=True)]
        for ratio in args.ratio:
            ks = layer_sizes("uniform", n_layers, d_ff, ratio)
            keeps = [
                top_k_indices(griffin_statistic(z), k) for z, k in zip(captured, ks, strict=True)
            ]
            for setting in args.settings.split(","):
                method, _, given = setting.partition(":")
                alpha = float(given) if given else default_alpha(ratio)
                if method in ("seq", "seqself"):
                    weights = sequential_weights(
                        model, downs, ids[:, :p], targets, keeps, full_w, alpha, method == "seqself"
                    )
                else:
                    weights = []
                    for layer in range(n_layers):
                        w, keep = full_w[layer], keeps[layer]
                        new = torch.zeros_like(w)
                        if method == "refit":
                            stats = GramStats.zeros(d_ff)
                            stats.add(captured[layer])
                            new[:, keep] = apply_regression(
                                stats.regression(keep, alpha, False), w
                            ).weight
                        else:
                            new[:, keep] = w[:, keep]
                        weights.append(new)
                for down, new in zip(downs, weights, strict=True):
                    down.weight.data = new
                with torch.inference_mode():
                    logits = model(input_ids=ids[:, p:], cache=cache, use_cache=True)
                cache.crop(-(ids.shape[1] - p))
                for down, w in zip(downs, full_w, strict=True):
                    down.weight.data = w
                pred = torch.cat([first[None], logits.logits[0, :-1].float()])
                loss = torch.nn.functional.cross_entropy(pred, ids[0, p:], reduction="sum")
                key = f"r={ratio:g} {setting}"
                nll[key] = nll.get(key, 0.0) + float(loss)
        with torch.inference_mode():
            logits = model(input_ids=ids[:, p:], cache=cache, use_cache=True).logits
        pred = torch.cat([first[None], logits[0, :-1].float()])
        nll["full"] = nll.get("full", 0.0) + float(
            torch.nn.functional.cross_entropy(pred, ids[0, p:], reduction="sum")
        )
        count += ids.shape[1] - p
        print(
            f"window {w_i + 1}/{len(windows)} {time.perf_counter() - started:.0f}s "
            + " ".join(f"{k}={math.exp(v / count):.2f}" for k, v in nll.items()),
            flush=True,
        )
    result = {
        "dataset": args.dataset,
        "seq_len": big_l,
        "prompt_len": p,
        "windows": len(windows),
        "tokens_scored": count,
        "ppl": {k: math.exp(v / count) for k, v in nll.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
