"""Streaming export of a mixture of experts: one decoder block in memory at a time, and of
its routed experts only those the prompts need.

The skeleton, the layer-major forward, the writer and the non-block tensors are the dense
streaming export's (:mod:`griffin_export.build.streaming`). What differs is the routed
experts:

* **Reading.** ``transformers`` fuses the routed experts into ``[experts, ...]`` tensors
  when it loads a checkpoint, which most families store per expert
  (``experts.<e>.w1.weight``, ``experts.<e>.gate_proj.weight``...). A block's fused
  tensors start as zeros; just before the experts module computes, a pre-hook reads the
  experts its tokens are routed to that are not in memory yet, and converts them with
  ``transformers``' own conversion (the family's ``WeightConverter`` from its
  ``conversion_mapping``, applied to those experts' checkpoint tensors alone), or, where
  the checkpoint stores the experts fused too (granitemoe, gpt-oss), reads those experts'
  slabs of the fused tensor. Experts no prompt token reaches are never read, except the few
  kept to fill ``E'`` (:func:`~griffin_export.core.moe_selection.choose_routed`), read when
  the layer's choice is made (their neurons rank by weight norms).
* **Selection and refit** are the in-memory path's own
  (:class:`~griffin_export.core.moe_selection.MoeLayerSelector`,
  :func:`~griffin_export.core.moe_selection.write_moe_refit`), and so is slicing
  (:func:`~griffin_export.core.moe.prune_moe_block`, :func:`~griffin_export.core.slicing.
  prune_block`), applied to the block in memory after its last prompt; the sliced block
  goes through ``transformers``' ``revert_weight_conversion`` (what ``save_pretrained``
  writes) to the writer. So the output is bit-identical to the in-memory export's
  (``tests/test_streaming_moe.py``).

The writing reads nothing more: every kept expert was read for the forward or as a filled
place. Peak memory is one block (its fused experts at full size, zeros where unread), the
block read ahead (without its experts: which are needed is known only once the prompts reach
the block, so experts are read then, not overlapped with computing), the write queue (the
output is planned in the model's order, so blocks never wait in it) and the prompts'
activations, whatever the depth. A checkpoint that loading converts beyond the routed
experts (sarvam_moe's fused attention) is not streamed (``NotStreamableError``; ``export``
then loads it in memory).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.build.streaming import (
    NotStreamableError,
    StreamedModel,
    StreamResult,
    _return_freed_blocks_to_the_os,
    _return_freed_memory_to_the_os,
    _tensors,
    block_path,
    blocks_from_source,
    put_non_block,
    reverted_plan,
    routed_expert_names,
)
from griffin_export.core.activations import run_layer_major
from griffin_export.core.compensation import Compensation, Refit
from griffin_export.core.moe import (
    dense_spec,
    expert_count,
    experts_of,
    is_moe_layer,
    layer_identity_tensors,
    prune_moe_block,
    set_moe_config,
    shared_present,
)
from griffin_export.core.moe_selection import (
    DEFAULT_EXPERT_SCORE,
    LayerChoice,
    MoeLayerChoice,
    MoeLayerSelector,
    MoeSelection,
    MoeSizes,
    capture_moe_inputs,
    check_expert_score,
    prune_moe_model,
    write_moe_refit,
)
from griffin_export.core.slicing import prune_block
from griffin_export.errors import UsageError
from griffin_export.storage.fingerprint import fingerprint_samples, samples_fingerprint
from griffin_export.storage.safetensors_io import SafetensorsReader, ShardWriter

# -- where each expert's tensors lie on disk ------------------------------------------------------

#: routed experts are read and converted at most this many bytes (of the model's dtype) at a
#: time (at least one expert)
READ_BYTES = 16 << 20


@dataclass
class ExpertTensor:
    """One fused routed-experts tensor of the model (``[experts, ...]``) and where its
    experts lie in the checkpoint: ``fused_key`` when stored fused with the experts first
    (read by slab), else per expert: ``parts[e]`` = ``[(source pattern, checkpoint key)]``,
    fused by ``converter`` (``transformers``' ``WeightConverter``)."""

    name: str
    fused_key: str | None = None
    converter: Any = None
    parts: dict[int, list[tuple[str, str]]] = field(default_factory=dict)

    def read(
        self, reader: SafetensorsReader, experts: list[int], model: Any, like: Tensor
    ) -> Tensor:
        """Experts ``experts`` of this tensor, ``[len(experts), ...]`` in the file's dtype,
        reading only their bytes."""
        shape = tuple(like.shape[1:])
        if self.fused_key is not None:
            count = like[0].numel()
            slabs = [reader.flat(self.fused_key, e * count, (e + 1) * count) for e in experts]
            return torch.stack([slab.reshape(shape) for slab in slabs])
        converter = copy.deepcopy(self.converter)
        for pattern in converter.source_patterns:
            for expert in experts:
                for part, key in self.parts.get(expert, []):
                    if part == pattern:
                        converter.add_tensor(self.name, key, pattern, reader.get(key))
        out = converter.convert(self.name, model=model, config=model.config)
        values = list(out.values())
        if len(values) != 1 or tuple(values[0].shape) != (len(experts), *shape):
            got = [tuple(v.shape) for v in values]
            raise UsageError(
                f"transformers' conversion of '{self.name}' for {len(experts)} expert(s) gave "
                f"{got}, not one [{len(experts)}, ...] tensor; griffin cannot stream this "
                "family: pass --in-memory"
            )
        return values[0]


def expert_tensors(streamed: StreamedModel) -> dict[str, ExpertTensor]:
    """Internal name -> :class:`ExpertTensor` for every routed-experts tensor of the model,
    from ``transformers``' own conversion mapping (the renamings and converters
    ``from_pretrained`` applies) matched against the checkpoint's keys."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_renamings,
        revert_weight_conversion,
    )

    model, reader = streamed.model, streamed.reader
    names = routed_expert_names(streamed.spec, model)
    out = {name: ExpertTensor(name) for name in names}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    for key in reader.keys():  # noqa: SIM118 (the reader is not iterable)
        renamed = apply_renamings(key, renamings)
        for converter in converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is None:
                continue
            entry = out.get(target)
            index = _expert_index(pattern, renamed)
            if entry is not None and index is not None:
                entry.converter = converter
                entry.parts.setdefault(index, []).append((pattern, key))
            break
    for name, entry in out.items():
        if entry.converter is not None:
            continue
        like = model.get_parameter_or_buffer(name)
        marker = torch.empty(like.shape, dtype=like.dtype, device="meta")
        reverted = revert_weight_conversion(model, {name: marker})
        (key, value), *rest = reverted.items()
        if rest or value is not marker or key not in reader or reader.shape(key) != like.shape:
            raise NotStreamableError(
                f"griffin cannot find the routed experts' tensor '{name}' in the checkpoint "
                "(neither per expert nor fused with the experts first); pass --in-memory"
            )
        entry.fused_key = key
    return out


def _expert_index(pattern: str, key: str) -> int | None:
    """The expert number a checkpoint key of source pattern ``pattern`` (``*`` for the
    number, e.g. ``.experts.*.w1.weight``) names."""
    regex = re.escape(pattern).replace(re.escape("*"), r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None


# -- the pass ---------------------------------------------------------------------------------


def moe_output_plan(
    streamed: StreamedModel, sizes: MoeSizes
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], int]:
    """The keys, shapes and dtypes the export of ``sizes`` writes (``save_pretrained``'s
    order), and its parameter count: a ``meta`` copy of the model sliced by the in-memory
    path's own pruning, its conversions reverted."""
    from transformers import AutoModelForCausalLM

    model, spec = streamed.model, streamed.spec
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=model.dtype)
    layers: list[LayerChoice] = []
    for block in spec.blocks(pruned):
        if not is_moe_layer(spec, block):
            assert sizes.dense is not None
            layers.append(torch.arange(sizes.dense))
            continue
        shared = None
        if shared_present(spec, block):
            assert sizes.shared is not None
            shared = torch.arange(sizes.shared)
        zeros = torch.zeros(sizes.experts_total)
        layers.append(
            MoeLayerChoice(
                experts=torch.arange(sizes.experts),
                neurons=torch.arange(sizes.width).repeat(sizes.experts, 1),
                shared=shared,
                importance=zeros,
                mass=zeros,
                tokens=zeros.long(),
            )
        )
    prune_moe_model(spec, pruned, MoeSelection(layers, sizes, tokens=0))
    return _in_model_order(streamed, reverted_plan(pruned)), int(pruned.num_parameters())


def _in_model_order(
    streamed: StreamedModel, plan: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``plan`` (``save_pretrained``'s key order, sorted by name: an untied ``lm_head`` first)
    in the model's order: the tensors before the blocks, block by block, the ones after. The
    writer writes in plan order and holds what arrives early, so this is the order tensors
    arrive in (an untied head last); by name, every block would wait for the head."""
    order = {name: i for i, (name, *_) in enumerate(_tensors(streamed.model))}
    inverse = {key: name for name, key in streamed.checkpoint_key.items()}
    prefix = streamed.spec.layers + "."
    block_rank: dict[str, int] = {}
    for name, position in order.items():
        if name.startswith(prefix):
            block_rank.setdefault(name[len(prefix) :].split(".")[0], position)

    def rank(key: str) -> int:
        if key.startswith(prefix):
            return block_rank[key[len(prefix) :].split(".")[0]]
        return order[inverse[key]]

    return {key: plan[key] for key in sorted(plan, key=rank)}


@torch.inference_mode()
def select_and_write_moe(
    streamed: StreamedModel,
    prompts: Sequence[Tensor],
    sizes: MoeSizes,
    directory: Path,
    max_shard_size: int,
    on_layer: Callable[[int], None] | None = None,
    compensation: Compensation | None = None,
    expert_score: str = DEFAULT_EXPERT_SCORE,
) -> StreamResult:
    """:func:`~griffin_export.build.streaming.select_and_write` for a mixture of experts:
    run ``prompts`` through the streamed model layer-major, choose every layer's experts and
    neurons as :func:`~griffin_export.core.moe_selection.select_moe` does (refitting with an
    active ``compensation``), and write the sliced model into ``directory``; sets the kept
    sizes in the config. ``on_layer(l)`` when layer ``l`` is sliced and handed to the writer.
    Same process-wide side effect as ``select_and_write`` (glibc's mmap threshold)."""
    from transformers.core_model_loading import revert_weight_conversion

    check_expert_score(expert_score)
    spec, model, reader = streamed.spec, streamed.model, streamed.reader
    prompts = [p for p in prompts if p.numel()]
    if not prompts:
        raise UsageError("the prompt has no tokens; pass a non-empty --prompt or --prompt-text")
    _return_freed_blocks_to_the_os()
    blocks = spec.blocks(model)
    plan, params = moe_output_plan(streamed, sizes)
    entries = [(key, shape, dtype) for key, (shape, dtype) in plan.items()]
    sources = expert_tensors(streamed)
    samples: dict[str, tuple[tuple[int, ...], Tensor]] = {}
    pending: dict[int, tuple[LayerChoice, dict[int, Refit], Refit | None]] = {}
    in_memory: dict[int, set[int]] = {}  # layer -> experts read so far
    writer = ShardWriter(directory, entries, max_shard_size, params)

    def load_experts(layer: int, wanted: list[int]) -> None:
        experts = experts_of(spec, blocks[layer])
        have = in_memory.setdefault(layer, set())
        total = expert_count(experts)
        new = sorted({e for e in wanted if 0 <= e < total} - have)
        if not new:
            return
        prefix = f"{spec.layers}.{layer}.{block_path(blocks[layer], experts)}."
        for name, _owner, _attr, tensor in _tensors(experts):
            # a few experts at a time: the conversion's copies stay small beside the block
            step = max(1, READ_BYTES // (tensor[0].numel() * tensor.element_size()))
            for start in range(0, len(new), step):
                part = new[start : start + step]
                values = sources[prefix + name].read(reader, part, model, tensor)
                index = torch.tensor(part, device=streamed.device)
                tensor.index_copy_(0, index, values.to(tensor.dtype).to(streamed.device))
        have.update(new)

    def routed(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int) -> None:
        values = [*args, *kwargs.values()]  # hidden states, routed experts, their weights
        load_experts(layer, torch.unique(values[1]).tolist())

    def started(layer: int) -> None:
        in_memory[layer] = set()
        for key, tensor in layer_identity_tensors(spec, layer, blocks[layer]):
            samples[key] = (tuple(tensor.shape), fingerprint_samples(tensor))

    def chosen(
        layer: int, choice: LayerChoice, refits: dict[int, Refit], other: Refit | None
    ) -> None:
        pending[layer] = (choice, refits, other)

    def finished(layer: int) -> None:
        block = blocks[layer]
        choice, refits, other = pending.pop(layer)
        write_moe_refit(spec, block, choice, refits, other)
        if isinstance(choice, Tensor):
            assert sizes.dense_total is not None
            prune_block(dense_spec(spec), block, choice, sizes.dense_total)
        else:
            prune_moe_block(spec, block, choice.experts, choice.neurons, choice.shared)
        prefix = f"{spec.layers}.{layer}."
        state = {prefix + name: tensor for name, _o, _a, tensor in _tensors(block)}
        for key, value in revert_weight_conversion(model, state).items():
            writer.put(key, value)
        in_memory.pop(layer, None)
        _return_freed_memory_to_the_os()
        if on_layer is not None:
            on_layer(layer)

    handles = [
        experts_of(spec, block).register_forward_pre_hook(
            lambda m, a, k, layer=layer: routed(m, a, k, layer), with_kwargs=True, prepend=True
        )
        for layer, block in enumerate(blocks)
        if is_moe_layer(spec, block)
    ]
    try:
        deferred = put_non_block(streamed, writer)
        selector = MoeLayerSelector(
            spec, model, sizes, len(prompts), chosen, compensation, expert_score, load_experts
        )
        lazy = frozenset(sources)
        with blocks_from_source(streamed, len(prompts), lazy, started, finished):
            tokens = run_layer_major(
                spec, model, prompts, selector.add, streamed.device, capture=capture_moe_inputs
            )
        deferred()
        writer.close()
    finally:
        for handle in handles:
            handle.remove()
        writer.abort()
        reader.close()
    set_moe_config(spec, model.config, sizes.experts, sizes.width, sizes.dense, sizes.shared)
    fingerprint = samples_fingerprint(
        (key, shape, parts) for key, (shape, parts) in samples.items()
    )
    return StreamResult(selector.selection(tokens), fingerprint, dict(writer.sha256))


def plan_moe_bytes(streamed: StreamedModel, sizes: MoeSizes) -> tuple[int, int]:
    """(parameter count, bytes) of the export of ``sizes``, as ``save_pretrained`` writes
    them (tied weights once)."""
    plan, _ = moe_output_plan(streamed, sizes)
    count = sum(math.prod(shape) for shape, _ in plan.values())
    size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in plan.values())
    return count, size
