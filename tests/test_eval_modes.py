"""`griffin eval`'s FF protocols (griffin_export/evaluation/eval_modes.py) and the lm-eval
bridge's generation loop, against references written out here: gen mode's refresh path
(PromptExperts with refresh N and window W), and stop sequences found incrementally."""

from __future__ import annotations

import json
import random
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch

from griffin_export import spec_for
from griffin_export.core.compensation import DEFAULT_METHOD
from griffin_export.errors import UsageError
from griffin_export.evaluation.eval_modes import (
    EvalSetting,
    PromptExperts,
    adaptive_settings,
    compensation_for,
)
from griffin_export.runtime.refresh import StopStrings, decode

from tiny import char_tokenizer, save_sentencepiece_tokenizer, save_tiny, tiny_model

K = 18  # neurons kept per layer of the tiny model (d_ff 37)


def _model() -> Any:
    """A tiny Llama whose FF outputs are scaled up 30x, so that which neurons run matters."""
    model = tiny_model("llama", seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30)
    return model


def _hand_masked(
    model: Any, ids: list[int], T: int, k: int, N: int, W: int | None
) -> tuple[torch.Tensor, dict[tuple[int, int], list[int]]]:
    """Logits ``[L, V]`` of one plain forward of ``ids`` (no cache) where, in every layer, each
    position p >= T keeps only its experts (the other down inputs zeroed), and those experts
    per ``(layer, p)``. Written out here: position p is generated step j = p - (T - 1); the
    last refresh at or before it is the largest multiple r of N with 1 <= r <= j; the experts
    are the top-k of sqrt(sum (z/|z|)^2) over positions [q - W, q) (q = T - 1 + r, the refresh
    position; all earlier ones without W), or over the prompt 0..T-1 before any refresh."""
    kept: dict[tuple[int, int], list[int]] = {}

    def hook(layer: int) -> Any:
        def masked(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            z = args[0].clone()
            unit = z[0].double() / z[0].double().norm(dim=-1, keepdim=True)
            for p in range(T, z.shape[1]):
                step = p - (T - 1)
                refreshes = [r for r in range(1, step + 1) if N and r % N == 0]
                if refreshes:
                    q = T - 1 + refreshes[-1]
                    rows = unit[(0 if W is None else max(0, q - W)) : q]
                else:
                    rows = unit[:T]
                keep = torch.topk(rows.pow(2).sum(dim=0).sqrt(), k).indices
                kept[layer, p] = sorted(keep.tolist())
                row = torch.zeros_like(z[0, p])
                row[keep] = z[0, p, keep]
                z[0, p] = row
            return (z, *args[1:])

        return masked

    handles = [
        block.mlp.down_proj.register_forward_pre_hook(hook(layer))
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, kept


@pytest.mark.parametrize(("N", "W"), [(3, 4), (2, None), (1, 2), (4, 9)])
def test_prompt_experts_refresh_equals_a_hand_masked_forward(N: int, W: int | None) -> None:
    """gen mode with refresh N and window W, decoding with the KV cache: after every forward
    the kept neurons of every layer equal the hand recomputation (:func:`_hand_masked`), and
    the logits equal one plain forward of the whole sequence with the other neurons zeroed.
    Catches a refresh one token early or late, a window that includes the current position or
    one too many/few, a refresh that ignores the window, experts never refreshed, and pruning
    the prefill."""
    model, spec = _model(), spec_for("llama")
    T, n = 6, 11
    prompt = torch.randint(3, 99, (1, T), generator=torch.Generator().manual_seed(N))
    logits: list[torch.Tensor] = []
    kept: list[list[list[int]]] = []  # per forward: per layer, the experts it ran with
    with PromptExperts(spec, model, [K] * 3, refresh=N, window=W) as experts:

        def pick(row: torch.Tensor) -> int:
            logits.append(row.clone())
            kept.append([sorted(m.nonzero().flatten().tolist()) for m in experts.keep])  # type: ignore[union-attr]
            return int(row.argmax())

        generated = decode(model, prompt, n, pick)
    ids = prompt[0].tolist() + generated[:-1]  # the last token is never fed back
    expected, hand_kept = _hand_masked(model, ids, T, K, N, W)
    torch.testing.assert_close(torch.stack(logits), expected[T - 1 :], rtol=1e-4, atol=1e-4)
    for j in range(1, n):  # forward j runs generated token j at position T - 1 + j
        for layer in range(3):
            assert kept[j][layer] == hand_kept[layer, T - 1 + j], (j, layer)
    changed = {tuple(kept[j][0]) for j in range(1, n)}
    assert len(changed) > 1  # the refreshes did change the experts: the test has teeth


def test_prompt_experts_without_refresh_keep_the_prompt_experts() -> None:
    """Without refresh every generated position keeps the experts of the prompt (no history
    is kept). Catches a refresh that runs with refresh 0."""
    model, spec = _model(), spec_for("llama")
    T, n = 6, 8
    prompt = torch.randint(3, 99, (1, T), generator=torch.Generator().manual_seed(0))
    kept: list[list[list[int]]] = []
    with PromptExperts(spec, model, [K] * 3) as experts:

        def pick(row: torch.Tensor) -> int:
            kept.append([sorted(m.nonzero().flatten().tolist()) for m in experts.keep])  # type: ignore[union-attr]
            return int(row.argmax())

        generated = decode(model, prompt, n, pick)
    _, hand_kept = _hand_masked(model, prompt[0].tolist() + generated[:-1], T, K, 0, None)
    assert all(
        kept[j][layer] == hand_kept[layer, T - 1 + j] for j in range(1, n) for layer in range(3)
    )
    assert experts.history == [None] * 3


# -- stop sequences ----------------------------------------------------------------------------


def _first_stop_by_full_decode(tokenizer: Any, ids: list[int], stops: list[str]) -> int | None:
    """The old rule, the oracle: after each token decode all tokens so far and search them."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if any(s and s in text for s in stops):
            return n
    return None


def _first_stop(tokenizer: Any, ids: list[int], stops: list[str]) -> int | None:
    watch = StopStrings(tokenizer, stops)
    for n, token in enumerate(ids, start=1):
        if watch.put(token):
            return n
    return None


def _byte_tokenizer() -> Any:
    """Byte-level BPE, one token per UTF-8 byte but for two merges that end a token inside a
    character: 'a' + the first byte of 'ï' (0xC3, 'Ã' in the byte alphabet) and ' ' + the
    first byte of '✓' (0xE2, 'â'), so such a token's text is held back with a letter in it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("a", "Ã"), ("Ġ", "â")]  # 'Ġ' is the space byte
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({a + b: len(alphabet) + i for i, (a, b) in enumerate(merges)})
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


TEXT = "Crème brûlée, naïve café ✓ — 雨が降る.\nQ: what? A: 42\n\nThe end </s> of it."


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "chars"])
def test_stop_strings_fire_where_the_full_decode_does(kind: str, tmp_path: Path) -> None:
    """For every stop string cut from the text (one to six characters, at every offset, also
    across multi-byte characters, leading spaces and special tokens) and pairs of them, the
    incremental search stops at the same token as searching the full decode after every token
    (the old O(n^2) rule). Catches searching only the newest piece (a stop split over two
    tokens), missing text held back inside a character, and skipping special tokens."""
    if kind == "bytes":
        tokenizer = _byte_tokenizer()
    elif kind == "chars":
        tokenizer = char_tokenizer()
    else:
        from transformers import AutoTokenizer

        directory = save_sentencepiece_tokenizer(tmp_path / "spm", TEXT * 20, 300)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids)
    rng = random.Random(0)
    cases = [[full[i : i + w]] for w in range(1, 7) for i in range(len(full) - w)]
    cases += [[rng.choice(cases)[0], rng.choice(cases)[0]] for _ in range(40)]
    cases += [[""], ["never there"], []]
    hits = 0
    for stops in cases:
        expected = _first_stop_by_full_decode(tokenizer, ids, stops)
        assert _first_stop(tokenizer, ids, stops) == expected, stops
        hits += expected is not None
    assert hits > len(cases) // 2


def test_gen_mode_greedy_with_stops_equals_the_full_decode_rule() -> None:
    """``griffin eval --mode gen``'s loop (GriffinLM._greedy, pruned with refresh) with stop
    sequences returns the tokens of the old loop that decoded the whole generation after
    every token, for stops that end at several points of the generation. Catches a stop found
    a token late or early, or not at all."""
    pytest.importorskip("lm_eval")
    from griffin_export.evaluation.lmeval_bridge import GriffinLM

    model, spec, tokenizer = _model(), spec_for("llama"), char_tokenizer()
    setting = EvalSetting("gen r=0.5", "gen", k=(K,) * 3, refresh=2, window=5)
    lm = GriffinLM(model, tokenizer, spec, setting)
    prompt = torch.tensor([tokenizer.encode("Count: 1 2 3")])
    n = 16

    def old(stops: list[str]) -> list[int]:
        generated: list[int] = []
        with PromptExperts(spec, model, [K] * 3, 2, 5):

            def pick(row: torch.Tensor) -> int:
                generated.append(int(row.argmax()))
                return generated[-1]

            def on_token(_token: int) -> None:
                if any(s and s in tokenizer.decode(generated) for s in stops):
                    raise StopIteration

            with suppress(StopIteration):
                decode(model, prompt, n, pick, stop=lm._stop_ids(), on_token=on_token)
        return generated

    unstopped = old([])
    text = tokenizer.decode(unstopped)
    stops_list = [[text[i : i + 3]] for i in (2, 9, 17)] + [["zz", text[-2:]], ["nowhere"]]
    lengths = set()
    for stops in stops_list:
        got = lm._greedy(prompt, n, stops)
        assert got == old(stops), stops
        lengths.add(len(got))
    assert len(lengths) >= 3  # the stops do cut the generation at different tokens


# -- --compensate defaults -----------------------------------------------------------------------


def test_class_mode_compensates_by_default_as_export_and_ppl_do() -> None:
    """With no --compensate, class mode refits with the library's default method (as
    ``griffin export`` and ``griffin ppl`` do), gen and static run none, and an explicit
    method outside class mode is refused in one line while an explicit none is accepted.
    Catches a default that differs between commands, and gen mode erroring on the default."""
    settings = adaptive_settings("class", 3, 37, [0.5], ["uniform"])
    assert [s.compensate for s in settings] == ["none", DEFAULT_METHOD]
    assert settings[1].name == f"class r=0.5 {DEFAULT_METHOD}" and settings[1].alpha is not None
    plain = adaptive_settings("class", 3, 37, [0.5], ["uniform"], compensate="none")
    assert [s.compensate for s in plain] == ["none", "none"] and plain[1].name == "class r=0.5"
    assert [s.compensate for s in adaptive_settings("gen", 3, 37, [0.5], ["uniform"])] == [
        "none",
        "none",
    ]
    assert compensation_for("gen", "none") == compensation_for("static", None) == "none"
    for mode in ("gen", "static"):
        with pytest.raises(UsageError, match=f"--compensate refit .*--mode {mode}"):
            compensation_for(mode, "refit")
    with pytest.raises(UsageError, match="--compensate 'nope' is not known"):
        compensation_for("class", "nope")


def test_eval_class_mode_default_equals_explicit_refit(tmp_path: Path) -> None:
    """``griffin eval`` on a full model without --compensate gives exactly the log-likelihoods
    of an explicit ``--compensate refit`` (the setting carries the method in its name).
    Catches the command or library keeping a default of its own."""
    pytest.importorskip("lm_eval")
    from griffin_export.evaluation.taskeval import evaluate_tasks

    directory = save_tiny("llama", tmp_path / "model", seed=3)
    data = tmp_path / "tiny_mc.jsonl"
    doc = {"context": "The cat sat on the", "choices": [" mat.", " moon!"], "label": 0}
    data.write_text(json.dumps(doc) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )

    def run(**kwargs: Any) -> Any:
        report = evaluate_tasks(
            str(directory), tasks=["tiny_mc"], include_path=[tmp_path], mode="class", **kwargs
        )
        return [s.name for s in report.settings], report.sample_rows()

    assert run() == run(compensate=DEFAULT_METHOD)
    assert run()[0] == ["full", f"class r=0.5 {DEFAULT_METHOD}"]
