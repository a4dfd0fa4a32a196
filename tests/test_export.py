"""End-to-end exports of tiny random models, one per architecture in the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from griffin_export import ARCHITECTURES, export, keep_count, prune_model, select_experts, spec_for
from griffin_export.core.architectures import MOE_ARCHITECTURES
from griffin_export.errors import UnsupportedArchitectureError
from griffin_export.formats.manifest import EXPERTS_FILE, MANIFEST
from griffin_export.storage.loading import state_dict_bytes
from griffin_export.storage.safetensors_io import payload_bytes

from tiny import MODEL_TYPES, loop_statistic, plain_top_k, random_ids, save_tiny, tiny_model

PROMPT = "Rivers carry water from the hills to the sea; rain fills them again."


def test_every_table_entry_has_a_tiny_model() -> None:
    assert set(MODEL_TYPES) == set(ARCHITECTURES) - set(MOE_ARCHITECTURES)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {mt: save_tiny(mt, root / mt) for mt in MODEL_TYPES}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def read_experts(out: Path) -> list[torch.Tensor]:
    tensors = load_file(str(out / EXPERTS_FILE))
    return [tensors[f"layer.{i}"].long() for i in range(len(tensors))]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ratio_one_reproduces_logits_exactly(
    model_type: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    result = export(str(sources[model_type]), [PROMPT], ratio=1.0, out=tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(sources[model_type]).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(17)
    assert torch.equal(logits(exported, ids), logits(original, ids))
    assert result.k_per_layer == [result.d_ff] * result.n_layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_half_export_reloads_and_matches_slicing_the_original(
    model_type: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    spec = spec_for(model_type)
    out = tmp_path / "out"
    result = export(str(sources[model_type]), [PROMPT], ratio=0.5, out=out, compensate="none")

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert spec.d_ff(exported.config) == 18 == result.k_per_layer[0]

    keep = read_experts(out)
    assert len(keep) == result.n_layers == len(spec.blocks(exported))
    for idx in keep:
        assert idx.numel() == 18
        assert torch.all(idx[1:] > idx[:-1])  # sorted and unique
        assert int(idx.min()) >= 0 and int(idx.max()) < 37

    # (a) the same as slicing the original in memory at the recorded indices
    sliced = AutoModelForCausalLM.from_pretrained(sources[model_type]).eval()
    prune_model(spec, sliced, keep)
    ids = random_ids(23, seed=5)
    assert torch.equal(logits(exported, ids), logits(sliced, ids))

    # (b) independently: the full original with the dropped down-projection inputs zeroed
    masked = AutoModelForCausalLM.from_pretrained(sources[model_type]).eval()
    for block, idx in zip(spec.blocks(masked), keep, strict=True):
        mask = torch.zeros(37).index_fill(0, idx, 1.0)
        spec.down_module(block).register_forward_pre_hook(lambda _m, a, mask=mask: (a[0] * mask,))
    torch.testing.assert_close(logits(exported, ids), logits(masked, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "opt"])
def test_selection_is_deterministic(
    model_type: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    export(str(sources[model_type]), [PROMPT], ratio=0.3, out=tmp_path / "a")
    export(str(sources[model_type]), [PROMPT], ratio=0.3, out=tmp_path / "b")
    for a, b in zip(read_experts(tmp_path / "a"), read_experts(tmp_path / "b"), strict=True):
        assert torch.equal(a, b)


def test_permuting_kept_neurons_changes_nothing() -> None:
    spec = spec_for("phi3")  # fused gate_up: the hardest layout to permute correctly
    a, b = tiny_model("phi3"), tiny_model("phi3")
    g = torch.Generator().manual_seed(3)
    keep = [torch.sort(torch.randperm(37, generator=g)[:20]).values for _ in range(3)]
    prune_model(spec, a, keep)
    prune_model(spec, b, [k[torch.randperm(20, generator=g)] for k in keep])
    ids = random_ids(11)
    torch.testing.assert_close(logits(a, ids), logits(b, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma"])
def test_file_bytes_equal_predicted_parameter_bytes(
    model_type: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = export(str(sources[model_type]), [PROMPT], ratio=0.5, out=out)
    payload = sum(payload_bytes(p) for p in out.glob("model*.safetensors"))
    assert payload == result.bytes_after
    assert result.file_bytes - payload < 64 * 1024  # the JSON header, nothing else
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert state_dict_bytes(reloaded)[1] == result.bytes_after
    assert result.bytes_after < result.bytes_before


@pytest.mark.parametrize("model_type", ["gpt2", "gemma", "opt"])  # tied embeddings
def test_tied_embeddings_stay_tied(
    model_type: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    export(str(sources[model_type]), [PROMPT], ratio=0.5, out=out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("lm_head") for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_export_directory_contents(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = export(str(sources["llama"]), [PROMPT, "A second prompt."], ratio=0.5, out=out)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        EXPERTS_FILE,
        MANIFEST,
        "README.md",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 18
    assert config["griffin"]["format_version"] == 1
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["k_per_layer"] == [18, 18, 18]
    assert manifest["prompt"]["count"] == 2
    assert manifest["prompt"]["tokens"] == result.prompt_tokens > len(PROMPT)
    assert manifest["source"]["fingerprint"].startswith("sha256-sampled:")
    assert set(manifest["files"]) == names - {MANIFEST}
    assert not [p for p in tmp_path.iterdir() if ".griffin-tmp-" in p.name]


def llama_down_inputs(model: torch.nn.Module, ids: list[int]) -> list[list[list[float]]]:
    """Per layer, the rows (one per token) of a Llama's down-projection input for one forward
    of ``ids``, captured by forward pre-hooks registered here on ``mlp.down_proj``."""
    captured: list[list[list[float]]] = []
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: captured.append(args[0][0].double().tolist())
        )
        for layer in model.model.layers  # type: ignore[union-attr]
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_pooled_prompts_keep_the_hand_computed_statistics_top_k(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Two prompts: the exported experts are, per layer, the top-k (lower index on ties) of
    sqrt(sum of (z_t/|z_t|)^2 over every token of both prompts), each prompt run on its own
    through the model with hooks written here; select_experts' scores equal that statistic.
    The alternatives (either prompt alone, the prompts concatenated into one sequence, the
    per-prompt statistics added) keep other experts, so the test catches each of them as a
    wrong pooling; it also catches a statistic without the per-token normalisation."""
    prompts = [PROMPT, "zzzz qqqq 0123 !!!"]
    src = sources["llama"]
    export(str(src), prompts, ratio=0.5, out=tmp_path / "two")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    per_prompt = [llama_down_inputs(model, i) for i in ids]  # [prompt][layer][token][neuron]
    k = keep_count(37, 0.5)
    pooled = [loop_statistic(a + b) for a, b in zip(*per_prompt, strict=True)]
    expected = [plain_top_k(s, k) for s in pooled]
    assert [e.tolist() for e in read_experts(tmp_path / "two")] == expected
    selection = select_experts(spec_for("llama"), model, [torch.tensor(i) for i in ids], 0.5)
    for scores, hand in zip(selection.scores, pooled, strict=True):
        assert scores.tolist() == pytest.approx(hand, rel=1e-5)

    def top(statistics: list[list[float]]) -> list[list[int]]:
        return [plain_top_k(s, k) for s in statistics]

    alone = [top([loop_statistic(z) for z in layers]) for layers in per_prompt]
    joined = top([loop_statistic(z) for z in llama_down_inputs(model, ids[0] + ids[1])])
    added = top(
        [
            [x + y for x, y in zip(loop_statistic(a), loop_statistic(b), strict=True)]
            for a, b in zip(*per_prompt, strict=True)
        ]
    )
    raw = top(
        [
            [math.sqrt(sum(t[j] ** 2 for t in a + b)) for j in range(37)]
            for a, b in zip(*per_prompt, strict=True)
        ]
    )
    for wrong in (*alone, joined, added, raw):
        assert wrong != expected


def test_multiple_of_and_dtype(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = export(
        str(sources["qwen2"]), [PROMPT], ratio=0.5, out=out, multiple_of=8, dtype="bfloat16"
    )
    assert result.k_per_layer == [16, 16, 16]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.config.intermediate_size == 16


def test_unknown_model_type_lists_supported(tmp_path: Path) -> None:
    src = save_tiny("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "bloom"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom' is not supported.*llama"):
        export(str(src), [PROMPT], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
