"""The refresh runtime: generate with an export, re-selecting its experts from the full
weights every N tokens (docs/design.md, "Refresh runtime").

The pruned model runs generation. The original's FF weights are memory-mapped from its
safetensors (zero-copy, read-only in effect), never built into a second model. A pre-hook on
every layer's first FF projection keeps the last W MLP inputs in a ring buffer. Every N
generated tokens (:class:`~griffin_export.core.schedule.RefreshSchedule`, the schedule
``griffin eval --mode gen`` and ``griffin ppl`` use too) each layer recomputes full-width
activations for those inputs from the original's gate/up weights, applies the export's
statistic and top-k, and copies only the neurons that changed into the slots of the ones that
left, in the live parameters' existing storage: no reallocation, the KV cache stays valid and
attention is never re-run.

On a compensated export (``griffin export --compensate refit``, the default) a refresh by
default also refits each layer's down projection on the ring window, as the export refitted it
on the prompt (``refit_on_refresh``; benchmarks/RESULTS-compensation.md measures both). With
the refit off, a layer whose experts changed gets the plain slice of the original's down
projection for its whole new set: the export's refitted columns of the neurons it kept were
fitted jointly with the neurons that left (they carry part of their output), so they are not
kept beside plain columns of the newcomers. A layer whose experts did not change keeps the
down projection it has (fitted, or sliced, for exactly that set).

Every :meth:`GriffinRuntime.generate` call starts from the export's experts: it first calls
:meth:`GriffinRuntime.reset`, which copies back (slot for slot, into the same storage) only
the rows a previous call's refreshes changed. So a call's tokens never depend on earlier calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from griffin_export.core.architectures import INPUT_ROLES, ArchSpec
from griffin_export.core.compensation import (
    DEFAULT_REFIT_ON_REFRESH,
    Compensation,
    GramStats,
    refit_stored,
)
from griffin_export.core.schedule import RefreshSchedule
from griffin_export.core.scoring import (
    jaccard,
    normalized_squares,
)
from griffin_export.core.selection import choose_experts, non_finite_message
from griffin_export.errors import UsageError
from griffin_export.formats.exports import OpenedExport, open_export, original_source
from griffin_export.formats.manifest import EXPERTS_FILE
from griffin_export.formats.verify import check_original
from griffin_export.storage.loading import require_tokenizer
from griffin_export.storage.safetensors_io import SafetensorsReader, load_state


@dataclass
class RefreshEvent:
    """One refresh: after ``token_index`` generated tokens, per layer the Jaccard overlap of the
    kept set with the previous one and how many neurons were copied in.

    ``kept`` (per layer, the kept neurons in slot order, i.e. the order of the live weight rows)
    is recorded only when asked (``generate(record_kept=True)``): it is a full index list per
    layer per refresh, hundreds of MB over a long run of a large model.
    """

    token_index: int
    overlap: list[float]
    changed: list[int]
    seconds: float
    kept: list[list[int]] | None = None

    @property
    def mean_overlap(self) -> float:
        return sum(self.overlap) / len(self.overlap)

    @property
    def total_changed(self) -> int:
        return sum(self.changed)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    refreshes: list[RefreshEvent] = field(default_factory=list)
    seed: int | None = None  # the sampling seed used (drawn from OS entropy if none was given)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for event in data["refreshes"]:
            if event["kept"] is None:
                del event["kept"]
        data["tokens_per_second"] = self.tokens_per_second
        return data


class _Ring:
    """The last ``size`` MLP inputs of one layer, and what a function computes from each one
    (the runtime: its full-width activations, from which come its term of the statistic and,
    on a compensated export, the refit's regressors), computed once per row.

    Rows are computed lazily: :meth:`cached` computes the rows written since the previous call
    only, so a refresh every N tokens with a window of W > N pays for N rows, not W. The
    statistic is a sum over rows and the refit's Gram matrix too, so their order in the buffer
    does not matter.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: Tensor | None = None  # [size, hidden]
        self.features: Tensor | None = None  # [size, F], valid where computed
        self.count = 0  # valid rows
        self.next = 0  # slot the next row goes to
        self.unscored = 0  # rows written since the last score_sums (the newest ones)

    def write(self, x: Tensor) -> None:  # x: [T, hidden]
        x = x[-self.size :]
        n = x.shape[0]
        if self.rows is None:
            self.rows = torch.empty(self.size, x.shape[-1], dtype=x.dtype, device=x.device)
        first = min(n, self.size - self.next)
        self.rows[self.next : self.next + first] = x[:first]
        if first < n:
            self.rows[: n - first] = x[first:]
        self.next = (self.next + n) % self.size
        self.count = min(self.size, self.count + n)
        self.unscored = min(self.size, self.unscored + n)

    def contents(self) -> Tensor:
        if self.rows is None:
            raise RuntimeError("the ring buffer is empty")
        return self.rows[: self.count] if self.count < self.size else self.rows

    def cached(self, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(rows)`` ``[T, F]`` of the buffered rows (in buffer order), calling
        ``compute`` on the rows not computed before only (always pass the same function)."""
        if self.rows is None:
            raise RuntimeError("the ring buffer is empty")
        if self.unscored:
            slots = (torch.arange(self.unscored) + self.next - self.unscored) % self.size
            new = compute(self.rows.index_select(0, slots.to(self.rows.device)))  # [n, F]
            if self.features is None:  # on the device that computes (the original's)
                self.features = new.new_zeros(self.size, new.shape[-1])
            self.features.index_copy_(0, slots.to(new.device), new)
            self.unscored = 0
        assert self.features is not None  # rows exist, so some were computed
        return self.features[: self.count]

    def score_sums(self, squares: Callable[[Tensor], Tensor]) -> Tensor:
        """``sum`` over the buffered rows of ``squares(rows)`` ``[T, d_ff]`` (:meth:`cached`)."""
        return self.cached(squares).sum(dim=0)


def full_activations(
    spec: ArchSpec,
    act: Callable[[Tensor], Tensor],
    full: dict[str, Tensor],
    x: Tensor,
    *,
    block: int = 1024,
) -> Tensor:
    """Full-width down-projection inputs ``[T, d_ff]`` for MLP inputs ``x`` ``[T, hidden]``,
    from the original's input projections (``full`` maps ``role`` / ``role.bias`` to tensors).

    When the original's dtype differs from ``x``'s, its weights are cast ``block`` neurons at a
    time (the rows being read), never as a whole tensor per call.
    """
    first = spec.roles()[0]
    axis = spec.neuron_axis(first)
    d_ff = full[first].shape[axis] // (2 if spec.fused_gate_up else 1)
    step = d_ff if full[first].dtype == x.dtype else block

    def project(role: str, lo: int, hi: int) -> Tensor:
        weight = full[role].narrow(axis, lo, hi - lo).to(x.dtype)
        y = x @ weight if spec.transposed else x @ weight.T
        bias = full.get(f"{role}.bias")
        return y if bias is None else y + bias[lo:hi].to(x.dtype)

    out = x.new_empty(x.shape[0], d_ff)
    for lo in range(0, d_ff, step):
        hi = min(lo + step, d_ff)
        if spec.fused_gate_up:  # [gate; up] along the neuron axis
            z = act(project("gate_up", lo, hi)) * project("gate_up", d_ff + lo, d_ff + hi)
        elif spec.gate is not None:
            z = act(project("gate", lo, hi)) * project("up", lo, hi)
        else:
            z = act(project("up", lo, hi))
        out[:, lo:hi] = z
    return out


class GriffinRuntime:
    """Generation with an export, refreshing its experts from the original's weights.

    Attributes:
        model: the live pruned model (its FF weights change in place at each refresh).
        slots: per layer, the original index of the neuron in each live row (slot order).

    Each :meth:`generate` call starts from the export's experts (it calls :meth:`reset`); after
    a call, ``model`` and ``slots`` stay as its last refresh left them, for inspection.
    """

    def __init__(
        self,
        export: OpenedExport,
        original: SafetensorsReader,
        *,
        original_device: str | torch.device = "cpu",
        refit_on_refresh: bool | None = None,
    ) -> None:
        self.export = export
        self.model: Any = export.loaded.model
        self.tokenizer = export.loaded.tokenizer
        self.spec = export.spec
        self.d_ff = int(export.manifest["source"]["d_ff"])
        experts = load_state([export.directory / EXPERTS_FILE])
        blocks = self.spec.blocks(self.model)
        self.slots = [experts[f"layer.{i}"].long() for i in range(len(blocks))]
        self._export_slots = [slots.clone() for slots in self.slots]
        self.original = original
        self._full: list[dict[str, Tensor]] = []
        for layer in range(len(blocks)):
            tensors: dict[str, Tensor] = {}
            for role in self.spec.roles():
                for kind, suffix in (("weight", ""), ("bias", ".bias")):
                    key = self.spec.param_name(layer, role, kind)
                    if key in original:
                        tensors[role + suffix] = original.map(key).to(original_device)
            self._full.append(tensors)
        self._acts = [getattr(self.spec.mlp_module(b), self.spec.act) for b in blocks]
        self._rings: list[_Ring] = []
        # A compensated export (griffin_export.core.compensation): its refitted down projections
        # are kept to reset to, and (by default) every refresh refits them on the ring window.
        recorded = export.manifest.get("compensation")
        self.compensation = (
            Compensation(str(recorded["method"]), float(recorded["alpha"])) if recorded else None
        )
        self.refit_on_refresh = _refit_choice(refit_on_refresh, self.compensation is not None)
        self._export_down: list[tuple[Tensor, Tensor | None]] = []
        if self.compensation is not None:
            for block in blocks:
                weight, bias = _down_tensors(self.spec, block)
                self._export_down.append(
                    (weight.detach().clone(), None if bias is None else bias.detach().clone())
                )
        if next(self.model.parameters()).device.type == "cpu":
            self._store_input_projections_column_major()

    def _store_input_projections_column_major(self) -> None:
        """Re-store the live gate/up (``nn.Linear``, ``[k, hidden]``) weights column-major.

        Same shapes and values, so every consumer is unaffected; ``F.linear`` then multiplies
        by a contiguous ``[hidden, k]`` matrix, which CPU GEMV kernels stream ~1.3x faster
        at batch 1 (benchmarks/bench_decode.py measures it on the full model too). GPT-2's
        ``Conv1D`` already stores ``[in, out]``; refresh copies work on either layout.
        """
        for block in self.spec.blocks(self.model):
            for role, module in self.spec.projections(block).items():
                if role in INPUT_ROLES and isinstance(module, nn.Linear):
                    weight = module.weight.detach()
                    module.weight = nn.Parameter(weight.T.contiguous().T, requires_grad=False)

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        original: str | None = None,
        *,
        device: str = "cpu",
        original_on_device: bool = False,
        refit_on_refresh: bool | None = None,
    ) -> GriffinRuntime:
        """Load ``export_dir`` for generation, with its original memory-mapped.

        ``original`` defaults to the source recorded in the manifest (for GGUF and the embedded
        model: the cached safetensors conversion). It is checked against the manifest's
        fingerprint, and a different model is refused. ``original_on_device`` copies the
        original's FF weights to ``device`` (faster refreshes when they fit).
        ``refit_on_refresh``: on a compensated export, refit the down projections on the ring
        window at each refresh (``None``: :data:`DEFAULT_REFIT_ON_REFRESH`); ``False`` slices
        the original's plain columns for every layer whose experts changed. ``True`` on an
        export without compensation is refused.
        """
        export = open_export(export_dir, device)
        source = original_source(export.manifest, original)
        check_original(export.directory, source.directory)
        mapped = SafetensorsReader.open(source.directory)
        return cls(
            export,
            mapped,
            original_device=device if original_on_device else "cpu",
            refit_on_refresh=refit_on_refresh,
        )

    def reset(self) -> int:
        """Put the export's experts back, slot for slot (so the live weights equal the export's
        again, bit for bit), copying only the rows that differ into the existing storage.
        Returns how many slots were rewritten. :meth:`generate` calls it first."""
        rewritten = 0
        for layer, block in enumerate(self.spec.blocks(self.model)):
            want, slots = self._export_slots[layer], self.slots[layer]
            positions = (slots != want).nonzero().flatten()
            if positions.numel():
                self._write(layer, block, positions, want[positions])
                slots[positions] = want[positions]
                rewritten += int(positions.numel())
            if self._export_down:  # the export's refitted down projection, whole
                saved, saved_bias = self._export_down[layer]
                live, live_bias = _down_tensors(self.spec, block)
                with torch.no_grad():
                    live.copy_(saved)
                    if saved_bias is not None and live_bias is not None:
                        live_bias.copy_(saved_bias)
        return rewritten

    def refresh(self, token_index: int = 0, *, record_kept: bool = False) -> RefreshEvent:
        """Re-select every layer's experts from its ring buffer and copy changed neurons in."""
        started = time.perf_counter()
        kept: list[list[int]] = []
        overlap: list[float] = []
        changed: list[int] = []
        blocks = self.spec.blocks(self.model)
        if len(self._rings) != len(blocks) or any(ring.rows is None for ring in self._rings):
            raise UsageError(
                "refresh() re-selects from the tokens of a running generate(), and none have "
                "been seen; call generate(..., refresh_every=N) with N > 0 instead"
            )
        for layer, block in enumerate(blocks):
            z = self._rings[layer].cached(partial(self._activations, layer))  # [W, d_ff]
            current = self.slots[layer].clone()
            sums = normalized_squares(z).sum(dim=0)
            _, new = choose_experts(sums, current.numel(), layer, z.dtype)
            changed.append(self._swap_in(layer, block, new))
            if self.refit_on_refresh:
                self._refit(layer, block, z)
            elif self.compensation is not None and changed[-1]:
                self._plain_down(layer, block)
            overlap.append(jaccard(current, new))
            if record_kept:
                kept.append(self.slots[layer].tolist())
        seconds = time.perf_counter() - started
        return RefreshEvent(token_index, overlap, changed, seconds, kept if record_kept else None)

    def _activations(self, layer: int, x: Tensor) -> Tensor:
        """Buffered MLP inputs' full-width down-projection inputs, from the original's
        weights (each row's term of the statistic and the refit's regressors)."""
        full = self._full[layer]
        x = x.to(next(iter(full.values())).device)
        return full_activations(self.spec, self._acts[layer], full, x)

    def _refit(self, layer: int, block: nn.Module, z: Tensor) -> None:
        """Refit the live down projection's kept columns (slot order) on the ring window's
        full-width activations ``z``, as ``griffin export`` refits on the prompt."""
        assert self.compensation is not None
        full = self._full[layer]
        stats = GramStats.zeros(self.d_ff, z.device)
        stats.add(z)
        refit = refit_stored(
            full["down"], self.slots[layer], stats, self.compensation, self.spec.transposed
        )
        live, live_bias = _down_tensors(self.spec, block)
        with torch.no_grad():
            live.copy_(refit.weight)
            if refit.bias is not None and live_bias is not None:
                live_bias.copy_(full["down.bias"] + refit.bias)

    def _plain_down(self, layer: int, block: nn.Module) -> None:
        """The live down projection as the plain slice of the original's at the current slots
        (every slot, also those of neurons kept from before), and the original's down bias."""
        slots = self.slots[layer]
        live, live_bias = _down_tensors(self.spec, block)
        positions = torch.arange(slots.numel())
        self._copy(live, self._full[layer]["down"], self.spec.neuron_axis("down"), positions, slots)
        if live_bias is not None and "down.bias" in self._full[layer]:
            with torch.no_grad():
                live_bias.copy_(self._full[layer]["down.bias"])

    def _swap_in(self, layer: int, block: nn.Module, new: Tensor) -> int:
        """Make the live block serve neurons ``new``: dropped neurons' slots take the added ones.
        Returns how many neurons were copied."""
        slots = self.slots[layer]
        leaving = (~torch.isin(slots, new)).nonzero().flatten()  # slot positions to overwrite
        arriving = new[~torch.isin(new, slots)]  # original neuron indices to copy in
        if leaving.numel() == 0:
            return 0
        self._write(layer, block, leaving, arriving)
        slots[leaving] = arriving
        return int(leaving.numel())

    def _write(self, layer: int, block: nn.Module, positions: Tensor, neurons: Tensor) -> None:
        """Copy the original's neurons ``neurons`` into the live slots ``positions``."""
        k = self.slots[layer].numel()
        for role, module in self.spec.projections(block).items():
            axis = self.spec.neuron_axis(role)
            dst, src = positions, neurons
            if role == "gate_up":  # [gate; up]: live rows s and k + s, original j and d_ff + j
                dst, src = (
                    torch.cat([positions, positions + k]),
                    torch.cat([neurons, neurons + self.d_ff]),
                )
            self._copy(module.weight, self._full[layer][role], axis, dst, src)
            bias = getattr(module, "bias", None)
            if role in INPUT_ROLES and isinstance(bias, Tensor):
                self._copy(bias, self._full[layer][f"{role}.bias"], 0, dst, src)

    @staticmethod
    def _copy(live: Tensor | nn.Module, full: Tensor, axis: int, dst: Tensor, src: Tensor) -> None:
        assert isinstance(live, Tensor)
        rows = full.index_select(axis, src.to(full.device)).to(live.device, live.dtype)
        with torch.no_grad():
            live.index_copy_(axis, dst.to(live.device), rows)

    # -- generation -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        refresh_every: int = 64,
        window: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        chat: bool = False,
        record_kept: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` (batch 1), greedy unless ``temperature`` > 0.

        Starts from the export's experts (:meth:`reset`), whatever earlier calls refreshed.
        Every ``refresh_every`` generated tokens (0 = never) the experts are re-chosen from the
        last ``window`` MLP inputs (with refresh off no inputs are recorded). Sampling without a
        ``seed`` draws one from OS entropy; the result records the seed used. Stops at any of
        the model's end tokens (``generation_config.eos_token_id``, an id or a list, and the
        tokenizer's EOS) unless ``stop_at_eos`` is False. ``chat`` wraps the prompt as one user
        turn in the tokenizer's chat template. ``record_kept`` keeps every refresh's full kept
        lists (:class:`RefreshEvent`). ``on_token(id)`` is called as each token is produced.
        """
        _check_generation_options(max_new_tokens, refresh_every, window, temperature, top_p, top_k)
        tokenizer = require_tokenizer(self.tokenizer, self.export.directory)
        if not prompt.strip():
            raise UsageError("the prompt is empty; pass --prompt FILE or --prompt-text TEXT")
        device = next(self.model.parameters()).device
        ids = torch.tensor([_prompt_ids(tokenizer, prompt, chat)], device=device)
        if seed is None and temperature > 0:
            seed = secrets.randbits(63)
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        stop = self.stop_ids() if stop_at_eos else set()
        self.reset()
        # Step j of the schedule is generated token j's forward (origin: the prompt's last
        # position); a ring of the last ``window`` MLP inputs is what its refreshes look back on.
        schedule = RefreshSchedule(refresh_every, window)
        self._rings = [_Ring(window) for _ in self.slots] if schedule.every else []
        handles = [
            self.spec.projections(block)[self.spec.roles()[0]].register_forward_pre_hook(
                lambda _m, args, ring=ring: ring.write(args[0].reshape(-1, args[0].shape[-1]))
            )
            for block, ring in zip(self.spec.blocks(self.model), self._rings, strict=False)
        ]
        events: list[RefreshEvent] = []

        def between(done: int) -> None:
            if schedule.due(done):
                events.append(self.refresh(done, record_kept=record_kept))

        started = time.perf_counter()
        try:
            generated = decode(
                self.model,
                ids,
                max_new_tokens,
                lambda logits: _sample(logits, temperature, top_p, top_k, generator),
                stop=stop,
                on_token=on_token,
                between=between,
            )
        finally:
            for handle in handles:
                handle.remove()
        seconds = time.perf_counter() - started
        text = tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(text, generated, ids.shape[1], seconds, events, seed)

    def stop_ids(self) -> set[int]:
        """The ids that end generation: ``generation_config.eos_token_id`` (an id or a list,
        e.g. Llama 3's ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's EOS."""
        config = getattr(self.model, "generation_config", None)
        found: set[int] = set()
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        for value in (getattr(config, "eos_token_id", None), tokenizer_eos):
            if isinstance(value, int):
                found.add(value)
            elif value is not None:
                found.update(int(v) for v in value)
        return found


def _refit_choice(asked: bool | None, compensated: bool) -> bool:
    """The runtime's ``refit_on_refresh``: the default for a compensated export, never for
    one without compensation (asking for it there is refused)."""
    if asked and not compensated:
        raise UsageError(
            "--refit-on-refresh needs a compensated export (griffin export --compensate "
            "refit, the default); this one was exported with --compensate none: drop the "
            "option or re-export"
        )
    return compensated and (DEFAULT_REFIT_ON_REFRESH if asked is None else asked)


def _down_tensors(spec: ArchSpec, block: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The live down projection's weight and bias (``None`` without one)."""
    down = spec.down_module(block)
    weight, bias = down.weight, getattr(down, "bias", None)
    assert isinstance(weight, Tensor)
    return weight, bias if isinstance(bias, Tensor) else None


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids; with ``chat``, as one user turn in the chat template."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "--chat: the export's tokenizer has no chat template; drop --chat and write "
            "the prompt in the model's own format"
        )
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])


class TextStream:
    """Text pieces as tokens arrive, for streaming: ``write(piece)`` gets each new piece once.

    Incremental detokenisation: each token decodes only a short window (the tokens since the
    previous piece plus the one before it, for context such as a leading space), so a long run
    costs O(n), not the O(n^2) of re-decoding everything; a piece ending in an incomplete UTF-8
    sequence (U+FFFD) is held until the next token completes it (:attr:`pending` holds it
    meanwhile). The pieces, then :attr:`pending`, concatenate to the decoded text. Special
    tokens are skipped, as in :class:`GenerationResult` ``.text``, unless
    ``skip_special_tokens`` is False.
    """

    def __init__(
        self, tokenizer: Any, write: Callable[[str], None], *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._write = write
        self._skip = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here have been written
        #: The decoded text of the tokens not written yet (held back, or nothing).
        self.pending = ""

    def _decode(self, stop: int) -> str:
        tokens = self._tokens[self._prefix : stop]
        return str(self._tokenizer.decode(tokens, skip_special_tokens=self._skip))

    def put(self, token: int) -> None:
        self._tokens.append(token)
        self._flush(final=False)

    def end(self) -> None:
        """Write whatever is held back (an incomplete sequence at the very end)."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        before, after = self._decode(self._read), self._decode(len(self._tokens))
        self.pending = after[len(before) :]
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._write(self.pending)
            self.pending = ""
            self._prefix, self._read = self._read, len(self._tokens)


class StopStrings:
    """Whether the text of the tokens so far contains any of ``stops`` (empty ones never
    match), decoded incrementally (:class:`TextStream`, special tokens kept): :meth:`put`
    searches only the text that is new since the previous token plus the ``len(stop) - 1``
    characters before it, so a run costs O(n), and it answers exactly as searching the
    decode of all the tokens after each one would."""

    def __init__(self, tokenizer: Any, stops: Collection[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._overlap = max((len(stop) - 1 for stop in self._stops), default=0)
        self._tail = ""  # the written text's last _overlap characters, then new pieces
        self._stream = TextStream(tokenizer, self._append, skip_special_tokens=False)

    def _append(self, piece: str) -> None:
        self._tail += piece

    def put(self, token: int) -> bool:
        """Add ``token``; True when a stop string appears in the text so far."""
        self._stream.put(token)
        text = self._tail + self._stream.pending
        self._tail = self._tail[max(0, len(self._tail) - self._overlap) :]
        return any(stop in text for stop in self._stops)


@torch.inference_mode()
def decode(
    model: Any,
    ids: Tensor,
    max_new_tokens: int,
    pick: Callable[[Tensor], int],
    *,
    stop: Collection[int] = (),
    on_token: Callable[[int], None] | None = None,
    between: Callable[[int], None] | None = None,
) -> list[int]:
    """The decode loop of the runtime (and of the benchmark's full-model reference).

    Prefill ``ids`` ``[1, T]``, then one token per forward with the KV cache, computing logits
    for the last position only. ``pick`` turns logits ``[V]`` into a token; a token in
    ``stop`` ends the loop (it is kept); ``between(n)`` runs after the n-th token, before the
    next forward.
    """
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1]
        if not bool(torch.isfinite(logits).all()):  # never decode token 0 from nan
            dtype = next(model.parameters()).dtype
            raise UsageError(non_finite_message("the model's logits", dtype))
        token = pick(logits)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or step == max_new_tokens - 1:
            break
        if between is not None:
            between(step + 1)
        next_ids = torch.tensor([[token]], device=ids.device)
        out = model(input_ids=next_ids, cache=out.cache, use_cache=True, logits_to_keep=1)
    return generated


def _check_generation_options(
    max_new_tokens: int,
    refresh_every: int,
    window: int,
    temperature: float,
    top_p: float,
    top_k: int,
) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if refresh_every < 0:
        raise UsageError(f"--refresh must be 0 (off) or a positive period, got {refresh_every}")
    if window < 1:
        raise UsageError(f"--window must be at least 1 token, got {window}")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {top_k}")


def _sample(
    logits: Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """Greedy when ``temperature`` is 0; else temperature, top-k and nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
