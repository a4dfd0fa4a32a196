"""The refresh runtime: exact weights after refresh, static behaviour without it, the ring
buffer's statistic against the full model, each call starting from the export, seeds, end
tokens, chat templates, and refusing a wrong or missing original."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, spec_for
from griffin_export.core.scoring import normalized_squares
from griffin_export.errors import (
    ModelLoadError,
    OriginalMismatchError,
    UsageError,
    VerificationError,
)
from griffin_export.runtime.refresh import GriffinRuntime, TextStream, _Ring, full_activations

from tiny import save_tiny

PROMPT = "The river runs to the sea, and the sea returns as rain."
ARCHS = ["llama", "gpt2", "phi3", "opt", "gpt_neox"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rt")
    made = {}
    for mt in ARCHS:
        src = save_tiny(mt, root / f"{mt}-src")
        export(str(src), [PROMPT], ratio=0.5, out=root / f"{mt}-exp", compensate="none")
        made[mt] = (src, root / f"{mt}-exp")
    return made


@pytest.mark.parametrize("model_type", ARCHS)
def test_weights_after_refresh_equal_the_original_sliced_at_the_event(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    src, out = exports[model_type]
    runtime = GriffinRuntime.from_export(out)
    result = runtime.generate(
        "Rain and rivers", max_new_tokens=30, refresh_every=7, window=9, record_kept=True
    )
    assert len(result.refreshes) >= 1
    assert sum(e.total_changed for e in result.refreshes) > 0  # experts did move
    event = result.refreshes[-1]
    assert event.kept is not None
    spec = spec_for(model_type)
    original = AutoModelForCausalLM.from_pretrained(src)
    d_ff = spec.d_ff(original.config)
    for layer, (live, full) in enumerate(
        zip(spec.blocks(runtime.model), spec.blocks(original), strict=True)
    ):
        slots = torch.tensor(event.kept[layer])
        assert torch.equal(slots, runtime.slots[layer])
        for role, module in spec.projections(live).items():
            full_module = spec.projections(full)[role]
            index = torch.cat([slots, slots + d_ff]) if role == "gate_up" else slots
            axis = spec.neuron_axis(role)
            assert torch.equal(module.weight, full_module.weight.index_select(axis, index))
            if getattr(module, "bias", None) is not None:
                want = full_module.bias if role == "down" else full_module.bias[index]
                assert torch.equal(module.bias, want)


def test_refresh_events_record_overlap(exports: dict[str, tuple[Path, Path]]) -> None:
    """Each event's per-layer overlap and changed count equal plain set arithmetic on the kept
    lists of consecutive events (the first against the export's experts file, read here).
    Catches an overlap against the wrong previous set (the export's instead of the last
    refresh's, or the new set with itself) and a count of slots touched instead of neurons
    that arrived."""
    out = exports["llama"][1]
    runtime = GriffinRuntime.from_export(out)
    result = runtime.generate(
        "Rain and rivers", max_new_tokens=24, refresh_every=6, window=6, record_kept=True
    )
    assert [e.token_index for e in result.refreshes] == [6, 12, 18]
    experts = load_file(str(out / "griffin_experts.safetensors"))
    previous = [set(experts[f"layer.{i}"].tolist()) for i in range(3)]
    for event in result.refreshes:
        assert event.kept is not None and len(event.kept) == len(event.overlap) == 3
        kept = [set(k) for k in event.kept]
        assert all(len(k) == len(slots) == 18 for k, slots in zip(kept, event.kept, strict=True))
        assert event.overlap == [
            len(a & b) / len(a | b) for a, b in zip(previous, kept, strict=True)
        ]
        assert event.changed == [len(b - a) for a, b in zip(previous, kept, strict=True)]
        previous = kept
    assert sum(e.total_changed for e in result.refreshes) > 0  # the check above saw moves


def test_events_keep_counts_only_unless_asked(exports: dict[str, tuple[Path, Path]]) -> None:
    """By default an event holds per-layer numbers, not index lists (bounded memory on long
    runs); asked, the lists come back. Catches keeping the lists regardless of the flag."""
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    result = runtime.generate(PROMPT, max_new_tokens=13, refresh_every=4, window=6)
    assert len(result.refreshes) == 3
    assert all(e.kept is None and len(e.changed) == 3 for e in result.refreshes)
    assert all("kept" not in e for e in result.to_dict()["refreshes"])


@pytest.mark.parametrize("model_type", ARCHS)
def test_refresh_off_equals_plain_generate_on_the_export(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    out = exports[model_type][1]
    runtime = GriffinRuntime.from_export(out)
    result = runtime.generate(PROMPT, max_new_tokens=25, refresh_every=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = runtime.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=25, do_sample=False)
    assert result.token_ids == reference[0, ids.shape[1] :].tolist()
    assert result.refreshes == []


def _capture(modules: list[torch.nn.Module]) -> tuple[dict[int, torch.Tensor], Any]:
    """Forward pre-hooks recording each module's input ``[T, features]`` by position."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for i, m in enumerate(modules)
    ]
    return seen, handles


@pytest.mark.parametrize("model_type", ARCHS)
def test_full_activations_equal_the_full_models_down_projection_input(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    """``full_activations`` on the MLP inputs of a forward of the full original equals the
    down-projection input that forward really had (hooks on the original model; its own
    activation, GLU order, fused halves and Conv1D layout). Catches swapped gate/up, the fused
    halves in the wrong order, a missing bias, a transposed weight read the wrong way, and a
    wrong block split when the weights are cast a block at a time (float64 weights here, float32
    inputs, block 5 over d_ff 37)."""
    src = exports[model_type][0]
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    spec = spec_for(model_type)
    blocks = spec.blocks(original)
    first = spec.roles()[0]
    inputs, in_handles = _capture([spec.projections(b)[first] for b in blocks])
    downs, down_handles = _capture([spec.projections(b)["down"] for b in blocks])
    ids = torch.tensor([[5, 17, 40, 3, 66, 23, 9, 81]])
    with torch.no_grad():
        original(input_ids=ids)
    for handle in in_handles + down_handles:
        handle.remove()
    for layer, block in enumerate(blocks):
        full: dict[str, torch.Tensor] = {}
        for role, module in spec.projections(block).items():
            if role != "down":
                full[role] = module.weight.detach()
                if getattr(module, "bias", None) is not None:
                    full[f"{role}.bias"] = module.bias.detach()
        act = getattr(spec.mlp_module(block), spec.act)
        with torch.no_grad():
            got = full_activations(spec, act, full, inputs[layer])
            wide = {k: v.double() for k, v in full.items()}
            blocked = full_activations(spec, act, wide, inputs[layer], block=5)
        torch.testing.assert_close(got, downs[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(blocked, downs[layer], rtol=1e-5, atol=1e-6)


def test_a_refresh_casts_only_blocks_of_the_original() -> None:
    """With the original in another dtype, no cast covers more than one block of neurons:
    a refresh must not make a full-size copy of gate/up each time. Catches casting the whole
    weight before slicing (``full[role].to(dtype)``), today's per-refresh copy."""
    cast_rows: list[int] = []

    class Watched(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.Tensor.to:
                cast_rows.append(args[0].shape[0])
            return super().__torch_function__(func, types, args, kwargs or {})

    spec = spec_for("llama")
    torch.manual_seed(0)
    full = {
        role: torch.randn(37, 8, dtype=torch.float64).as_subclass(Watched)
        for role in ("gate", "up")
    }
    x = torch.randn(4, 8)
    got = full_activations(spec, torch.nn.functional.silu, full, x, block=10)
    plain = {k: torch.Tensor(v).float() for k, v in full.items()}
    expected = torch.nn.functional.silu(x @ plain["gate"].T) * (x @ plain["up"].T)
    torch.testing.assert_close(torch.Tensor(got), expected, rtol=1e-5, atol=1e-6)
    assert cast_rows and max(cast_rows) <= 10


def test_refresh_scores_equal_scoring_the_window_through_the_full_model(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """The refresh path's per-layer sums (ring filled token by token during decoding, wrapping
    around, scored lazily) equal a plain loop over the last W tokens: the export's own MLP
    inputs (a fresh forward of the export loaded by transformers) pushed one token at a time
    through the full original's MLP, each captured down-projection input z_t normalised and
    squared, summed. The refresh then keeps that oracle's top k. Catches a ring that drops or
    repeats rows on wrap-around, inputs from the wrong layer or position, and scoring with the
    live (pruned) weights instead of the original's."""
    src, out = exports["llama"]
    runtime = GriffinRuntime.from_export(out)
    window = 11
    result = runtime.generate(PROMPT, max_new_tokens=20, refresh_every=1000, window=window)
    spec = runtime.spec
    ids = runtime.tokenizer(PROMPT)["input_ids"] + result.token_ids[:-1]  # what went through
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs, handles = _capture([spec.mlp_module(b) for b in spec.blocks(exported)])
    with torch.no_grad():
        exported(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    kept = runtime.refresh(record_kept=True).kept  # scores the rings, keeps their sums
    assert kept is not None

    def unused(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the refresh scored every buffered row")

    sums = [normalized_squares(ring.cached(unused)).sum(0) for ring in runtime._rings]
    for layer, block in enumerate(spec.blocks(original)):
        mlp = spec.mlp_module(block)
        z, handles = _capture([spec.projections(block)["down"]])
        oracle = torch.zeros(mlp.down_proj.in_features)
        for x_t in inputs[layer][-window:]:
            with torch.no_grad():
                mlp(x_t[None, None])
            unit = z[0][0] / z[0][0].norm()
            oracle += unit * unit
        handles[0].remove()
        torch.testing.assert_close(sums[layer], oracle, rtol=1e-4, atol=1e-6)
        want = torch.topk(oracle, len(kept[layer])).indices.tolist()
        assert set(kept[layer]) == set(want)


def _fresh_logits(runtime: GriffinRuntime) -> torch.Tensor:
    ids = torch.tensor([runtime.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return runtime.model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_each_call_starts_from_the_exports_experts(
    model_type: str, exports: dict[str, tuple[Path, Path]]
) -> None:
    """After a call whose refreshes moved experts, a refresh-off call gives the same tokens as a
    fresh runtime, and the live model the same logits bit for bit (the export's neurons back
    in their own slots). Catches keeping the last call's experts (the runtime before the fix),
    and restoring the kept set in another slot order or from another dtype."""
    out = exports[model_type][1]
    fresh = GriffinRuntime.from_export(out)
    want = fresh.generate(PROMPT, max_new_tokens=20, refresh_every=0)
    runtime = GriffinRuntime.from_export(out)
    moved = runtime.generate("Rain and rivers", max_new_tokens=30, refresh_every=5, window=7)
    assert sum(e.total_changed for e in moved.refreshes) > 0
    got = runtime.generate(PROMPT, max_new_tokens=20, refresh_every=0)
    assert got.token_ids == want.token_ids
    assert all(torch.equal(a, b) for a, b in zip(runtime.slots, fresh.slots, strict=True))
    assert torch.equal(_fresh_logits(runtime), _fresh_logits(fresh))


def test_unseeded_sampling_draws_a_seed_and_records_it(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """Two unseeded sampled runs record different seeds and sample different tokens, and the
    recorded seed repeats a run. Catches a generator that always starts from the same state
    when no seed is given (every unseeded run repeating, the runtime before the fix), a seed
    that never reaches the sampler, and a recorded seed that is not the one used."""
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    options: dict[str, Any] = dict(max_new_tokens=15, temperature=1.5, refresh_every=0)
    first = runtime.generate(PROMPT, **options)
    second = runtime.generate(PROMPT, **options)
    assert first.seed is not None and second.seed is not None and first.seed != second.seed
    assert first.token_ids != second.token_ids  # 15 draws at temperature 1.5 over 99 tokens
    one, two = (runtime.generate(PROMPT, seed=s, **options).token_ids for s in (1, 2))
    assert one != two  # the seed reaches the sampler
    assert runtime.generate(PROMPT, seed=first.seed, **options).token_ids == first.token_ids
    assert runtime.generate(PROMPT, seed=second.seed, **options).token_ids == second.token_ids
    assert runtime.generate(PROMPT, max_new_tokens=3).seed is None  # greedy draws none


@pytest.mark.parametrize("eos", [[7, 50], 50])
def test_stops_at_the_generation_configs_end_tokens(
    exports: dict[str, tuple[Path, Path]], eos: Any
) -> None:
    """A model forced to emit token 50 (a hook on its head) whose generation_config lists 50 as
    an end token (as a list, as Llama 3 does, or as an int) stops after it. Catches honouring
    only the tokenizer's EOS (id 2 here), or only an int."""
    runtime = GriffinRuntime.from_export(exports["llama"][1])

    def force(_m: Any, _a: Any, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., 50] = 1e4
        return logits

    runtime.model.get_output_embeddings().register_forward_hook(force)
    runtime.model.generation_config.eos_token_id = eos
    assert runtime.generate(PROMPT, max_new_tokens=10, refresh_every=3).token_ids == [50]
    kept_going = runtime.generate(PROMPT, max_new_tokens=10, stop_at_eos=False)
    assert kept_going.token_ids == [50] * 10


def test_chat_applies_the_tokenizers_template(exports: dict[str, tuple[Path, Path]]) -> None:
    """With ``chat`` the prompt is one user turn in the tokenizer's chat template (generation
    prompt added): tokens and prompt length equal generating from the template's text written
    out by hand. Catches ignoring ``chat`` or leaving out the generation prompt; without a
    template the error names --chat."""
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    with pytest.raises(UsageError, match=r"--chat.*no chat template"):
        runtime.generate(PROMPT, chat=True)
    runtime.tokenizer.chat_template = (
        "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    chatted = runtime.generate(PROMPT, max_new_tokens=8, chat=True)
    by_hand = runtime.generate(f"U: {PROMPT}\nA:", max_new_tokens=8)
    assert chatted.prompt_tokens == by_hand.prompt_tokens == len(PROMPT) + 6
    assert chatted.token_ids == by_hand.token_ids


def _byte_tokenizer() -> Any:
    """Byte-level BPE without merges: one token per UTF-8 byte, so 'é' is two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_text_stream_pieces_are_the_text_without_split_characters() -> None:
    """Streaming a byte-level tokenisation of text with multi-byte characters: the pieces join
    to the text, none holds a replacement character, and no decode call sees more than a few
    tokens however long the text. Catches writing each token's own decode (split UTF-8 shows
    as U+FFFD) and re-decoding everything so far (O(n^2))."""
    tokenizer = _byte_tokenizer()
    text = "Crème brûlée, naïve café ✓ — 雨が降る. " * 20
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    widths: list[int] = []
    decode = tokenizer.decode

    def counting(tokens: list[int], **kwargs: Any) -> str:
        widths.append(len(tokens))
        return str(decode(tokens, **kwargs))

    tokenizer.decode = counting
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append)
    for token in ids:
        stream.put(token)
    stream.end()
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert max(widths) <= 8


def test_text_stream_end_writes_what_it_held() -> None:
    """A run cut off inside a character still writes its bytes at the end (as the result's
    text does). Catches an ``end()`` that drops the held-back tail."""
    tokenizer = _byte_tokenizer()
    ids = tokenizer("ok é")["input_ids"][:-1]  # the last byte of 'é' never comes
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append)
    for token in ids:
        stream.put(token)
    assert "".join(pieces) == "ok "
    stream.end()
    assert "".join(pieces) == tokenizer.decode(ids)


def test_runtime_is_importable_from_the_package() -> None:
    """The library API promises ``from griffin_export import GriffinRuntime``."""
    from griffin_export import GriffinRuntime as exported

    assert exported is GriffinRuntime


def test_ring_keeps_the_last_rows() -> None:
    ring = _Ring(4)
    ring.write(torch.arange(6.0).reshape(6, 1))
    assert sorted(ring.contents().flatten().tolist()) == [2, 3, 4, 5]
    for value in (6.0, 7.0, 8.0):
        ring.write(torch.tensor([[value]]))
    assert sorted(ring.contents().flatten().tolist()) == [5, 6, 7, 8]
    small = _Ring(10)
    small.write(torch.ones(3, 2))
    assert small.contents().shape == (3, 2)


def test_ring_scores_each_row_once_and_sums_the_window() -> None:
    """score_sums after any pattern of writes (wrapping, refreshes in between) equals scoring
    the buffered rows from scratch, and only the rows new since the last call are scored."""
    torch.manual_seed(0)
    ring = _Ring(7)
    weight = torch.randn(5, 9)
    scored: list[int] = []

    def squares(x: torch.Tensor) -> torch.Tensor:
        scored.append(x.shape[0])
        return normalized_squares(torch.nn.functional.silu(x @ weight))

    for chunk in (10, 1, 1, 3, 1, 5, 1):
        ring.write(torch.randn(chunk, 5))
        before = len(scored)
        got = ring.score_sums(squares)
        assert scored[before:] == [min(chunk, 7)]
        expected = normalized_squares(torch.nn.functional.silu(ring.contents() @ weight)).sum(0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ring.score_sums(squares) is not None and len(scored) == 7  # nothing new: no call


def test_ring_scores_on_the_device_that_computes_them() -> None:
    """Rows on one device, scores computed on another (the original's weights stay on the CPU
    while the model runs on an accelerator): the cache follows the scores' device."""
    ring = _Ring(4)
    ring.write(torch.randn(6, 3))
    sums = ring.score_sums(lambda x: torch.empty(x.shape[0], 5, device="meta"))
    assert sums.device.type == "meta" and sums.shape == (5,)
    ring.write(torch.randn(1, 3))
    assert ring.score_sums(lambda x: torch.empty(x.shape[0], 5, device="meta")).shape == (5,)


def test_a_different_original_is_refused(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    other = save_tiny("llama", tmp_path / "other", seed=1)
    with pytest.raises(OriginalMismatchError, match="is not the model"):
        GriffinRuntime.from_export(exports["llama"][1], original=str(other))


def test_a_missing_original_is_a_clear_error(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    src, out = exports["gpt2"]
    moved_out = tmp_path / "exp"
    shutil.copytree(out, moved_out)
    manifest = json.loads((moved_out / "griffin.json").read_text())
    manifest["source"]["directory"] = str(tmp_path / "gone")
    manifest["source"]["model"] = str(tmp_path / "gone")
    (moved_out / "griffin.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"not available here.*--original"):
        GriffinRuntime.from_export(moved_out)
    GriffinRuntime.from_export(moved_out, original=str(src))  # naming it works


def test_bad_generation_options(exports: dict[str, tuple[Path, Path]]) -> None:
    runtime = GriffinRuntime.from_export(exports["llama"][1])
    with pytest.raises(UsageError, match="--window"):
        runtime.generate(PROMPT, window=0)
    with pytest.raises(UsageError, match="--top-p"):
        runtime.generate(PROMPT, temperature=1.0, top_p=0)
    sampled = runtime.generate(PROMPT, max_new_tokens=10, temperature=0.8, top_k=20, seed=3)
    again = GriffinRuntime.from_export(exports["llama"][1]).generate(
        PROMPT, max_new_tokens=10, temperature=0.8, top_k=20, seed=3
    )
    assert sampled.token_ids == again.token_ids


def test_cli_generate_json(exports: dict[str, tuple[Path, Path]]) -> None:
    out = exports["llama"][1]
    args = ["generate", "--model", str(out), "--prompt-text", PROMPT, "-n", "12", "--refresh", "4"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["token_ids"]) == 12 and len(data["refreshes"]) == 2
    assert data["tokens_per_second"] > 0 and data["seed"] is None
    assert all("kept" not in e and len(e["changed"]) == 3 for e in data["refreshes"])
    full = CliRunner().invoke(app, [*args, "--json", "--events", "full"])
    assert full.exit_code == 0, full.output
    assert all(len(e["kept"]) == 3 for e in json.loads(full.stdout)["refreshes"])
    streamed = CliRunner().invoke(app, args)
    assert streamed.exit_code == 0, streamed.output
    assert "refreshes" in streamed.output


def test_cli_streams_the_same_text(exports: dict[str, tuple[Path, Path]]) -> None:
    """The streamed text is the decoded result, each piece once (greedy, so the --json run
    produces the same tokens). Catches pieces written twice or dropped by the streamer."""
    out = exports["llama"][1]
    args = ["generate", "--model", str(out), "--prompt-text", PROMPT, "-n", "40", "--refresh", "8"]
    data = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    streamed = CliRunner().invoke(app, args)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == data["text"] + "\n"


def test_cli_sampling_reports_its_seed(exports: dict[str, tuple[Path, Path]]) -> None:
    """An unseeded sampled run reports the seed it drew, and --seed with it repeats the run.
    Catches a --json result without the seed, or one that cannot reproduce the tokens."""
    out = exports["llama"][1]
    args = ["generate", "--model", str(out), "-t", PROMPT, "-n", "12", "--temperature", "1.5"]
    first = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    again = CliRunner().invoke(app, [*args, "--json", "--seed", str(first["seed"])])
    assert json.loads(again.stdout)["token_ids"] == first["token_ids"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--chat"], "--chat"), (["--events", "full"], "--json"), (["--events", "all"], "--events")],
)
def test_cli_generate_refusals(
    exports: dict[str, tuple[Path, Path]], extra: list[str], message: str
) -> None:
    """--chat without a chat template, --events full without --json, and an unknown --events
    value each exit 2 with one line naming the option."""
    out = exports["llama"][1]
    result = CliRunner().invoke(app, ["generate", "-m", str(out), "-t", PROMPT, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_tampered_export_is_refused(
    exports: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    tampered = tmp_path / "exp"
    shutil.copytree(exports["llama"][1], tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="failed verification"):
        GriffinRuntime.from_export(tampered)


@pytest.mark.parametrize(("model_type", "method"), [("llama", "refit"), ("gpt2", "refit-bias")])
def test_refit_off_refresh_slices_the_plain_original_where_the_experts_changed(
    model_type: str, method: str, tmp_path: Path
) -> None:
    """With ``refit_on_refresh=False`` on a refitted export, a refresh that changes a layer's
    experts leaves that layer's whole down projection (and down bias) equal to the original's
    plain slice at the new slots, bit for bit; a layer whose experts did not change keeps the
    export's refitted values. The rings hold exactly the prompt's MLP inputs, so layer 0
    (whose MLP input the pruning cannot change) re-selects the export's experts. Catches
    refitted columns of neurons kept from before left beside plain columns of the newcomers,
    a refit run anyway, the export's refitted bias kept, and an unchanged layer needlessly
    reset to the plain slice."""
    src = save_tiny(model_type, tmp_path / "src")
    out = tmp_path / "out"
    export(str(src), [PROMPT], ratio=0.5, out=out, compensate=method, alpha=0.5)
    runtime = GriffinRuntime.from_export(out, refit_on_refresh=False)
    assert runtime.refit_on_refresh is False
    tokens = len(runtime.tokenizer(PROMPT)["input_ids"])
    runtime.generate(PROMPT, max_new_tokens=1, refresh_every=1, window=tokens)  # prefill only
    with torch.inference_mode():  # as generate runs it
        event = runtime.refresh(0)
    assert event.changed[0] == 0 and any(event.changed[1:]), event.changed
    spec = spec_for(model_type)
    stored = load_file(out / "model.safetensors")
    original = load_file(src / "model.safetensors")
    axis = spec.neuron_axis("down")
    for layer, block in enumerate(spec.blocks(runtime.model)):
        key, bias_key = spec.param_name(layer, "down"), spec.param_name(layer, "down", "bias")
        down = spec.down_module(block)
        live = down.weight.detach()
        plain = original[key].index_select(axis, runtime.slots[layer])
        if event.changed[layer]:
            assert torch.equal(live, plain), layer
            if method == "refit-bias":
                assert torch.equal(down.bias.detach(), original[bias_key])
        else:
            assert torch.equal(live, stored[key]) and not torch.equal(live, plain)
            if method == "refit-bias":
                assert torch.equal(down.bias.detach(), stored[bias_key])


def test_refit_on_refresh_needs_a_compensated_export(
    exports: dict[str, tuple[Path, Path]],
) -> None:
    """Asking for the refit on an export without compensation is refused with the fix, and
    the default there is off. Catches a runtime that silently refits an uncompensated export
    (changing what ``--compensate none`` means) or ignores the request."""
    out = exports["llama"][1]
    assert GriffinRuntime.from_export(out).refit_on_refresh is False
    with pytest.raises(UsageError, match="--refit-on-refresh needs a compensated export"):
        GriffinRuntime.from_export(out, refit_on_refresh=True)
    result = CliRunner().invoke(
        app, ["generate", "-m", str(out), "-t", PROMPT, "--refit-on-refresh"]
    )
    assert result.exit_code == 2 and "--compensate none" in result.output


@pytest.mark.parametrize(
    ("flags", "want"),
    [([], None), (["--refit-on-refresh"], True), (["--no-refit-on-refresh"], False)],
)
def test_cli_refit_on_refresh_flag(
    flags: list[str], want: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``griffin generate`` passes the flag's three states to the runtime as None (the
    library's default), True and False. Catches a flag wired to nothing, inverted, or a CLI
    default that overrides the library's."""
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise UsageError("stop here")

    monkeypatch.setattr(GriffinRuntime, "from_export", fake)
    result = CliRunner().invoke(app, ["generate", "-m", "x", "-t", PROMPT, *flags])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["refit_on_refresh"] is want


@pytest.mark.slow
def test_embedded_model_chat(tmp_path: Path) -> None:
    """``--chat`` on the embedded SmolLM2 (an instruct model) exported at keep 0.5: the runtime
    feeds the ChatML turn written out by hand (its template's system line included), so the
    tokens equal generating from that text, refreshes and all; ``<|im_end|>`` ends a run; the
    CLI takes the flag. Catches --chat ignored or the generation prompt left out."""
    out = tmp_path / "smol-half"
    prompt = Path(__file__).parents[1] / "examples" / "prompt.txt"
    args = ["export", "--prompt", str(prompt), "--ratio", "0.5", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    runtime = GriffinRuntime.from_export(out)
    question = "What is the capital of France?"
    by_hand = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    chatted = runtime.generate(question, max_new_tokens=12, chat=True, refresh_every=4)
    written = runtime.generate(by_hand, max_new_tokens=12, refresh_every=4)
    assert chatted.prompt_tokens == written.prompt_tokens
    assert chatted.token_ids == written.token_ids
    assert runtime.tokenizer.convert_tokens_to_ids("<|im_end|>") in runtime.stop_ids()
    cli = ["generate", "-m", str(out), "-t", question, "--chat", "-n", "4", "--json"]
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == chatted.prompt_tokens
