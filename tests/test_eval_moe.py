"""`griffin eval` on mixtures of experts: class and gen modes against a plain recomputation
(``select_moe`` on the request's context, ``prune_moe_model`` on a copy, the full model's KV
cache of the context continued by the copy), on the tiny local tasks of test_eval."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import test_eval as dense
import torch
from test_ppl_moe import save_tiny_moe

from griffin_export import spec_for
from griffin_export.core.compensation import Compensation
from griffin_export.core.moe_selection import plan_moe_sizes, prune_moe_model, select_moe
from griffin_export.errors import UsageError

from tiny import char_tokenizer

pytest.importorskip("lm_eval")

# test_eval's tiny local tasks, offline environment and helpers
tasks_dir = dense.tasks_dir
offline = dense.offline
_run = dense._run
_continuation_loglik = dense._continuation_loglik


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_moe("qwen2_moe", tmp_path_factory.mktemp("moe") / "model")


def _load(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _pruned_copy(model: Any, prompt: torch.Tensor, method: str, alpha: float) -> Any:
    """``prune_moe_model`` of a copy of ``model`` to what ``prompt`` chooses (experts 0.5,
    ratio 0.5), refitted there with ``method``."""
    spec = spec_for(model.config.model_type)
    pruned = copy.deepcopy(model)
    sizes = plan_moe_sizes(spec, model, 0.5, 0.5)
    chosen = select_moe(spec, pruned, [prompt], sizes, compensation=Compensation(method, alpha))
    prune_moe_model(spec, pruned, chosen)
    return pruned


@pytest.mark.parametrize("method", ["none", "refit"])
def test_class_mode_equals_the_context_choosing_and_a_pruned_last_position(
    moe_dir: Path, tasks_dir: Path, method: str
) -> None:
    """class r=0.5 experts=0.5 on one document: each request's log-likelihood equals the full
    model on all positions but the last, and, at the last, a copy pruned to what those
    positions choose (refitted there with ``refit``) continuing the full model's cache.
    Catches choosing from the scored position too, pruning the context's positions, and the
    refit (or --experts) dropped on the way from the command to the hooks; --check (every
    expert and neuron kept) equals the full column bit for bit."""
    report = _run(
        str(moe_dir),
        tasks_dir,
        mode="class",
        ratios=[0.5],
        experts=0.5,
        limit=1,
        compensate=method,
        alpha=0.5,
        check=True,
    )
    name = "class r=0.5 experts=0.5" + ("" if method == "none" else f" {method}")
    assert [s.name for s in report.settings] == ["full", name, "check r=1"]
    assert report.check is not None and report.check["equal"]
    model, tok = _load(moe_dir), char_tokenizer()
    differs = False
    for row in report.sample_rows():
        context, continuation = row["arguments"]
        ids = tok.encode(context + continuation)
        n_cont = len(tok.encode(continuation))
        inp = torch.tensor(ids[:-1])
        pruned = _pruned_copy(model, inp[:-1], method, 0.5)
        with torch.no_grad():
            prefix = model(input_ids=inp[None, :-1], use_cache=True)
            last = pruned(input_ids=inp[None, -1:], cache=prefix.past_key_values, use_cache=True)
            full = model(input_ids=inp[None]).logits[0]
        logits = torch.cat([prefix.logits[0], last.logits[0]])
        expected = _continuation_loglik(logits, ids, n_cont)
        assert row["responses"]["full"][0] == pytest.approx(
            _continuation_loglik(full, ids, n_cont), abs=1e-4
        )
        assert row["responses"][name][0] == pytest.approx(expected, abs=1e-4)
        differs |= abs(expected - row["responses"]["full"][0]) > 1e-3
    assert differs  # the reference really prunes something


def test_gen_mode_decodes_with_the_prompts_experts(moe_dir: Path, tasks_dir: Path) -> None:
    """gen r=0.5 experts=0.5: each text equals greedy decoding that continues the full
    model's cache of the prompt with a copy pruned to what the prompt chose; --check (every
    expert and neuron kept) equals the full column. Catches a pruned prefill, experts chosen
    from generated tokens, and pruned layers rebuilt wrongly between decode steps."""
    report = _run(str(moe_dir), tasks_dir, tasks=["tiny_gen"], mode="gen", experts=0.5, check=True)
    model, tok = _load(moe_dir), char_tokenizer()
    for row in report.sample_rows():
        prompt = torch.tensor(tok.encode(row["arguments"][0]))
        pruned = _pruned_copy(model, prompt, "none", 1.0)
        generated: list[int] = []
        with torch.no_grad():
            out = model(input_ids=prompt[None], use_cache=True)
            for _ in range(6):
                generated.append(int(out.logits[0, -1].argmax()))
                step = torch.tensor([[generated[-1]]])
                out = pruned(input_ids=step, cache=out.past_key_values, use_cache=True)
        text = tok.decode(generated, skip_special_tokens=True).split("\n")[0]
        assert row["responses"]["gen r=0.5 experts=0.5"] == text
    assert report.check is not None and report.check["equal"]


def test_options_moe_modes_do_not_take_are_refused(moe_dir: Path, tasks_dir: Path) -> None:
    """--refresh (gen) and --budget other than uniform are refused on a mixture of experts,
    --experts on a dense model, each in one line naming the option."""
    with pytest.raises(UsageError, match="--refresh"):
        _run(str(moe_dir), tasks_dir, tasks=["tiny_gen"], mode="gen", refresh=2)
    with pytest.raises(UsageError, match="--budget"):
        _run(str(moe_dir), tasks_dir, mode="class", budgets=["protect"])
    with pytest.raises(UsageError, match="--experts"):
        _run(str(moe_dir), tasks_dir, mode="class", experts=1.5)


def test_static_mode_on_an_moe_export_scores_the_export(
    moe_dir: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    """--mode static on an MoE export: its column's log-likelihoods are the export's as stock
    ``from_pretrained`` loads it, the full column the original's. Catches an export opened
    with the original's full experts (the dense path's tensor sharing) or with per-layer
    widths read as a non-uniform dense budget (a dense layer 0 beside routed experts)."""
    from griffin_export import export

    out = tmp_path / "out"
    export(str(moe_dir), ["the sea comes back as rain " * 3], 0.5, experts=0.5, out=out)
    report = _run(str(out), tasks_dir, mode="static", limit=1)
    exported, full, tok = _load(out), _load(moe_dir), char_tokenizer()
    for row in report.sample_rows():
        context, continuation = row["arguments"]
        ids = tok.encode(context + continuation)
        n_cont = len(tok.encode(continuation))
        inp = torch.tensor(ids[:-1])[None]
        with torch.no_grad():
            mine = _continuation_loglik(exported(input_ids=inp).logits[0], ids, n_cont)
            theirs = _continuation_loglik(full(input_ids=inp).logits[0], ids, n_cont)
        assert row["responses"]["out"][0] == pytest.approx(mine, abs=1e-4)
        assert row["responses"]["full"][0] == pytest.approx(theirs, abs=1e-4)
