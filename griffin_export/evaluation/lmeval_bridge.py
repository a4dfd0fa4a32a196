"""The lm-eval model class behind ``griffin eval``: Hugging Face's ``HFLM`` on an already
loaded model, with the FF protocol of one :class:`~griffin_export.evaluation.taskeval.EvalSetting`.

Imported only by :func:`griffin_export.evaluation.taskeval.evaluate_tasks`, after lm-eval was found.
"""

from __future__ import annotations

from contextlib import nullcontext, suppress
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from torch import nn

from griffin_export.core.architectures import ArchSpec
from griffin_export.errors import UsageError
from griffin_export.evaluation.eval_modes import (
    SERVES,
    EvalSetting,
    PromptExperts,
    class_mode,
    moe_prompt_experts,
)
from griffin_export.runtime.refresh import StopStrings, decode


class _Stop(Exception):
    """Raised from the decode loop's token callback when a stop sequence appeared."""


class GriffinLM(HFLM):
    """``HFLM`` serving one setting: ``plain`` (the model as it is), ``class`` or ``gen``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        setting: EvalSetting,
        *,
        batch_size: int = 1,
        max_gen_tokens: int | None = None,
    ) -> None:
        kwargs = {} if max_gen_tokens is None else {"max_gen_toks": max_gen_tokens}
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.spec = spec
        self.setting = setting

    # -- request types ---------------------------------------------------------------------------

    def _serves(self, kind: str) -> None:
        mode = self.setting.protocol
        if mode != "plain" and kind not in SERVES[mode]:
            raise UsageError(f"--mode {mode} cannot serve {kind} requests")

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        self._serves("loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        self._serves("loglikelihood_rolling")
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self._serves("generate_until")
        return super().generate_until(requests, disable_tqdm=True)

    # -- class -----------------------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> Any:
        if self.setting.protocol != "class":
            return super()._model_call(inps, attn_mask, labels)
        if inps.shape[0] != 1:
            raise UsageError(f"--mode class needs --batch-size 1, got a batch of {inps.shape[0]}")
        if inps.shape[1] < 2:
            raise UsageError(
                "--mode class needs at least one token before the scored one, got a request "
                "whose context and continuation make one token"
            )
        s = self.setting
        hooks = (
            nullcontext()
            if s.k is None
            else class_mode(
                self.spec, self.model, s.k, inps.shape[1], s.compensate, s.alpha, s.moe, inps
            )
        )
        with hooks:
            return super()._model_call(inps)

    # -- gen -------------------------------------------------------------------------------------

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any
    ) -> torch.Tensor:
        if self.setting.protocol != "gen":
            return super()._model_generate(context, max_length, stop, **kwargs)
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
            raise UsageError(
                "--mode gen decodes greedily, and this task asks for sampling "
                "(do_sample/temperature); evaluate it with --mode static on an export"
            )
        mask = kwargs.get("attention_mask")
        rows = []
        for b in range(context.shape[0]):
            ids = context[b] if mask is None else context[b][mask[b].bool()]
            new = self._greedy(ids[None], max_length - context.shape[1], stop)
            rows.append(torch.cat([context[b], torch.tensor(new, dtype=context.dtype)]))
        width = max(r.numel() for r in rows)
        out = torch.full((len(rows), width), self.eot_token_id, dtype=context.dtype)
        for b, row in enumerate(rows):
            out[b, : row.numel()] = row
        return out

    def _greedy(self, ids: torch.Tensor, max_new: int, stop: list[str]) -> list[int]:
        """Greedy tokens after ``ids`` ``[1, T]`` with the runtime's decode loop, pruned as
        the setting says, until EOS, a stop sequence or ``max_new`` tokens."""
        generated: list[int] = []
        stops = StopStrings(self.tokenizer, stop)

        def on_token(token: int) -> None:
            generated.append(token)
            if stops.put(token):
                raise _Stop

        k, sizes = self.setting.k, self.setting.moe
        hooks: Any
        if k is None:
            hooks = nullcontext()
        elif sizes is not None:
            hooks = moe_prompt_experts(self.spec, self.model, sizes, ids.to(self.device))
        else:
            hooks = PromptExperts(
                self.spec, self.model, k, self.setting.refresh, self.setting.window
            )
        with hooks, suppress(_Stop):
            decode(
                self.model,
                ids.to(self.device),
                max(max_new, 1),
                lambda logits: int(logits.argmax()),
                stop=self._stop_ids(),
                on_token=on_token,
            )
        return generated

    def _stop_ids(self) -> set[int]:
        """lm-eval's end-of-text id and the model's own end tokens (``generation_config``'s,
        an id or a list), as the refresh runtime and ``generate`` stop."""
        ends = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return {self.eot_token_id, *([ends] if isinstance(ends, int) else ends or [])}
