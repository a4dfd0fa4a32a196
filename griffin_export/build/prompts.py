"""Prompts: reading prompt files (UTF-8 text only, with errors that say what to do), their
token ids for a loaded model, and the sha256 a manifest records."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from griffin_export.errors import UsageError
from griffin_export.storage.loading import LoadedModel, require_tokenizer


def read_prompt_file(path: str) -> str:
    """The text of a prompt file (``-`` reads standard input).

    Refuses missing, unreadable, binary (NUL bytes) and non-UTF-8 files.
    """
    if path == "-":
        data = sys.stdin.buffer.read()
        where = "standard input"
    else:
        file = Path(path).expanduser()
        if not file.exists():
            raise UsageError(
                f"prompt file '{path}' does not exist; check the path given to --prompt"
            )
        if file.is_dir():
            raise UsageError(f"prompt file '{path}' is a directory; pass a text file to --prompt")
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise UsageError(
                f"prompt file '{path}' cannot be read ({exc.strerror}); check its permissions"
            ) from exc
        where = f"prompt file '{path}'"
    if b"\0" in data:
        raise UsageError(f"{where} looks binary (it has NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{where} is not valid UTF-8 (byte {exc.start}); convert it, e.g. with iconv -t utf-8"
        ) from None
    if not text.strip():
        raise UsageError(f"{where} is empty; a prompt needs some text")
    return text


def gather_prompts(files: list[str] | None, texts: list[str] | None) -> list[str]:
    """All prompts from ``--prompt`` files and ``--prompt-text`` values, in that order."""
    prompts = [read_prompt_file(f) for f in files or []]
    for text in texts or []:
        if not text.strip():
            raise UsageError("--prompt-text is empty or whitespace; give it some text")
        prompts.append(text)
    if not prompts:
        raise UsageError(
            "no prompt given; pass --prompt FILE (or - for stdin) or --prompt-text TEXT"
        )
    return prompts


def tokenize_prompts(
    loaded: LoadedModel, prompts: Sequence[str], max_tokens: int | None
) -> tuple[list[Tensor], list[str]]:
    """Token ids of each prompt, truncated to ``max_tokens`` and the model's context."""
    tokenizer = require_tokenizer(loaded.tokenizer, loaded.source.name)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    limits = [v for v in (max_tokens, context) if isinstance(v, int) and v > 0]
    limit = min(limits) if limits else None
    warnings: list[str] = []
    ids: list[Tensor] = []
    for i, text in enumerate(prompts):
        encoded = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if limit is not None and encoded.numel() > limit:
            why = "--max-prompt-tokens" if limit == max_tokens else "the model's context length"
            warnings.append(
                f"prompt {i + 1} has {encoded.numel()} tokens; truncated to {limit} ({why})"
            )
            encoded = encoded[:limit]
        ids.append(encoded)
    return ids, warnings


def prompt_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompt texts (UTF-8), separated by NUL bytes."""
    return hashlib.sha256(b"\0".join(p.encode("utf-8") for p in prompts)).hexdigest()
