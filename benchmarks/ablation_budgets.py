"""Ablation of per-layer budgets (issue 7) under the ``griffin`` perplexity protocol.

As ``griffin ppl --protocol griffin`` (docs/design.md, "Perplexity protocols"): per L-token window
the first P run through the full model, every layer's experts are the top-k_l of the GRIFFIN
statistic over those P positions, positions >= P run with only those experts (a pre-hook on
every down projection zeroes the other neurons), and positions P..L-1 are scored (the first of
them predicted from position P-1, which is unpruned, as in ``evaluate.window_nll``).

To measure many settings cheaply the prefix runs once per window (with the KV cache kept) and
only the L-P suffix runs once per setting; the budget methods need every layer's statistics
before the first pruned layer runs, which a single masked forward cannot provide.

Usage:
    .venv/bin/python benchmarks/ablation_budgets.py --ratio 0.5 --dataset wiki-summaries \
        --settings full,uniform,protect,energy,minimax,output --out benchmarks/results/x.json

Setting names: ``full``; a budget method (``uniform``, ``protect``, ``energy``, ``minimax``,
``output``, or ``taylor``: greedy on the Fisher estimate ``sum_t (dLoss/dz_tj * z_tj)^2`` of the
prompt's own next-token loss, one backward pass over the prompt); suffixes ``+bias``
(dropped neurons replaced by their prompt mean, i.e. their mean contribution folded into the
down bias), ``+floor<f>`` (every layer keeps at least f of the uniform k), ``@<n>`` (experts
chosen from the last n prompt tokens only), ``+protect`` (first and last layer dense, the
method shares the rest; ``+protect:0:1:-1`` names the layers), ``+protectlast``, ``+mix<w>``
(uniform + w * (method - uniform)).
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
from budget_methods import (  # noqa: E402  (benchmarks/, next to this script)
    blend,
    energy_gains,
    layer_budgets,
    output_gains,
    selection_order,
)

from griffin_export.core.scoring import griffin_statistic, keep_count, top_k_indices  # noqa: E402


@dataclass
class Parsed:
    name: str
    method: str
    bias: bool = False
    floor: float = 0.0
    last: int | None = None
    protect: tuple[int, ...] = ()
    mix: float = 1.0


def parse_setting(name: str) -> Parsed:
    head, _, last = name.partition("@")
    parts = head.split("+")
    parsed = Parsed(name, parts[0], last=int(last) if last else None)
    for part in parts[1:]:
        if part == "bias":
            parsed.bias = True
        elif part == "protect":
            parsed.protect = (0, -1)
        elif part.startswith("protect:"):  # e.g. protect:0:1:-1
            parsed.protect = tuple(int(x) for x in part.split(":")[1:])
        elif part == "protectlast":
            parsed.protect = (-1,)
        elif part.startswith("mix"):
            parsed.mix = float(part[3:])
        elif part.startswith("floor"):
            parsed.floor = float(part[5:])
        else:
            raise SystemExit(f"unknown setting suffix {part!r} in {name!r}")
    return parsed


def fisher_sums(model: torch.nn.Module, spec: object, ids: Tensor) -> list[Tensor]:
    """Per layer ``sum_t (dLoss/dz_tj * z_tj)^2`` (``[d_ff]`` float64): the Fisher estimate of
    what removing FF neuron j costs the prompt's own next-token loss (one backward pass)."""
    blocks = spec.blocks(model)  # type: ignore[attr-defined]
    zs: list[Tensor] = []
    handles = []
    for block in blocks:

        def keep_grad(_m: torch.nn.Module, a: tuple[Tensor, ...]) -> None:
            a[0].retain_grad()
            zs.append(a[0])

        handles.append(spec.down_module(block).register_forward_pre_hook(keep_grad))  # type: ignore[attr-defined]
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = [(z.grad[0] * z[0]).detach().double().square().sum(0) for z in zs]  # type: ignore[index]
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, action="append", required=True)
    ap.add_argument("--settings", default="full,uniform,protect,energy,minimax,output")
    add_window_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = time.perf_counter()

    loaded, windows = load_windows(args.model, args)
    model, spec = loaded.model, loaded.spec
    L, P = args.seq_len, args.prompt_len
    blocks = spec.blocks(model)
    n_layers = len(blocks)
    d_ff = spec.d_ff(model.config)
    down_norms = [
        torch.linalg.vector_norm(spec.down_module(b).weight.detach().float(), dim=0)  # [d_ff]
        for b in blocks
    ]
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    any_taylor = any(st.method == "taylor" for st in settings)
    if any(st.method == "taylor" and st.last for st in settings):
        raise SystemExit("taylor@n is not supported (the Fisher pass uses the whole prompt)")
    for param in model.parameters():
        param.requires_grad_(False)
    nll: dict[str, float] = {}
    count: dict[str, int] = {}
    budgets_seen: dict[str, list[list[int]]] = {}

    for w, window in enumerate(windows):
        ids = window.ids.reshape(1, -1)
        captured: list[Tensor] = [torch.empty(0)] * n_layers
        handles = []
        for i, block in enumerate(blocks):

            def grab(
                _m: torch.nn.Module,
                a: tuple[Tensor, ...],
                i: int = i,
                captured: list[Tensor] = captured,
            ) -> None:
                captured[i] = a[0][0].detach().float().clone()  # [P, d_ff]

            handles.append(spec.down_module(block).register_forward_pre_hook(grab))
        with torch.inference_mode():
            out = model(
                input_ids=ids[:, :P], use_cache=True, output_hidden_states=True, logits_to_keep=1
            )
        for h in handles:
            h.remove()
        cache = out.past_key_values
        fisher = fisher_sums(model, spec, ids[:, :P]) if any_taylor else None
        first_logit = out.logits[0, -1].float()  # predicts position P
        streams = [hs[0].float() for hs in out.hidden_states[:n_layers]]  # inputs of blocks

        for ratio in args.ratio:
            k = keep_count(d_ff, ratio)
            total = n_layers * k
            for st in settings:
                key = f"r={ratio:g} {st.name}"
                masks: list[Tensor | None] = [None] * n_layers
                fill: list[Tensor | None] = [None] * n_layers
                if st.method != "full":
                    zs = [z if st.last is None else z[-st.last :] for z in captured]
                    scores = [griffin_statistic(z) for z in zs]
                    if st.method == "taylor":
                        assert fisher is not None
                        gains = [f[selection_order(s)] for f, s in zip(fisher, scores, strict=True)]
                    elif st.method == "output":
                        hs = [h if st.last is None else h[-st.last :] for h in streams]
                        rel = [
                            (z.square() / h.square().sum(-1, keepdim=True).clamp_min(1e-12)).sum(0)
                            for z, h in zip(zs, hs, strict=True)
                        ]
                        gains = [
                            output_gains(s, r, dn)
                            for s, r, dn in zip(scores, rel, down_norms, strict=True)
                        ]
                    else:
                        gains = [energy_gains(s) for s in scores]
                    min_k = max(1, math.ceil(st.floor * k))
                    method = "greedy" if st.method in ("output", "taylor") else st.method
                    ks = layer_budgets(method, gains, total, min_k=min_k, protect=st.protect)
                    if st.mix < 1.0:
                        ks = blend(ks, k, st.mix)
                    assert sum(ks) == total, (ks, total)
                    budgets_seen.setdefault(key, []).append(ks)
                    for layer in range(n_layers):
                        m = torch.zeros(d_ff)
                        m[top_k_indices(scores[layer], ks[layer])] = 1
                        masks[layer] = m
                        if st.bias:
                            fill[layer] = zs[layer].mean(0) * (1 - m)  # prompt mean, dropped only
                handles = []
                for i, block in enumerate(blocks):

                    def prune(
                        _m: torch.nn.Module,
                        a: tuple[Tensor, ...],
                        i: int = i,
                        masks: list[Tensor | None] = masks,
                        fill: list[Tensor | None] = fill,
                    ) -> tuple[Tensor, ...] | None:
                        mask = masks[i]
                        if mask is None:
                            return None
                        z = a[0] * mask
                        extra = fill[i]
                        if extra is not None:
                            z = z + extra
                        return (z, *a[1:])

                    handles.append(spec.down_module(block).register_forward_pre_hook(prune))
                with torch.inference_mode():
                    logits = (
                        model(input_ids=ids[:, P:], past_key_values=cache, use_cache=True)
                        .logits[0]
                        .float()
                    )  # [L-P, V]
                for h in handles:
                    h.remove()
                cache.crop(-(ids.shape[1] - P))  # drop the suffix again
                pred = torch.cat([first_logit[None], logits[:-1]])  # predicts P..L-1
                loss = torch.nn.functional.cross_entropy(pred, ids[0, P:], reduction="sum")
                nll[key] = nll.get(key, 0.0) + float(loss)
                count[key] = count.get(key, 0) + int(ids.shape[1] - P)
        done = {key: math.exp(nll[key] / count[key]) for key in nll}
        print(
            f"window {w + 1}/{len(windows)} {time.perf_counter() - started:.0f}s "
            + " ".join(f"{key}={v:.2f}" for key, v in done.items()),
            flush=True,
        )
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "seq_len": L,
        "prompt_len": P,
        "windows": len(windows),
        "tokens_scored": next(iter(count.values())),
        "seconds": round(time.perf_counter() - started, 1),
        "ppl": {key: math.exp(nll[key] / count[key]) for key in nll},
        "mean_budgets": {
            key: [round(sum(col) / len(col), 1) for col in zip(*v, strict=True)]
            for key, v in budgets_seen.items()
        },
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
