"""Prompts: reading prompt files (UTF-8 text only, with errors that say what to do), their
token ids for a loaded model, and the sha256 a manifest records."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from griffin_export.errors import UsageError
from griffin_export.storage.loading import LoadedModel, require_tokenizer
from griffin_export.storage.loading import tokenize_prompts as tokenize


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
    """Token ids of each prompt with the loaded model's tokenizer, truncated to ``max_tokens``
    and the model's context (:func:`~griffin_export.storage.loading.tokenize_prompts`)."""
    tokenizer = require_tokenizer(loaded.tokenizer, loaded.source.name)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    return tokenize(tokenizer, prompts, max_tokens, context)
