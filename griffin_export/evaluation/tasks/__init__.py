"""griffin's multiple-choice tasks, from the packaged corpora (docs/design.md, "Task evaluation").

They are **ours, not standard benchmarks**: quick, offline sanity checks of whether a pruned
model still tells a coherent continuation from an unrelated one. Each document is a context,
four choices and the index of the true one; the true choice is the text that really follows
the context in the corpus, the three distractors are drawn from elsewhere in the same corpus
at the same position (so their style matches), all with a fixed seed.

* ``griffin_wiki_next``: the first sentence of a Wikipedia lead summary; choose its true second
  sentence among four (distractors: second sentences of three other summaries).
* ``griffin_shakespeare_next``: a speaker's name and the first three lines of a speech; choose
  its true fourth line among four (distractors: fourth lines of three other speeches).

The data are generated at run time from the installed corpora (nothing large is committed)
into ``<cache>/tasks/v<VERSION>``, next to lm-eval task YAML files that point at them; the
same corpora always give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from griffin_export.evaluation.corpora import load_corpus

#: Bump when the builders change, so cached files are rebuilt.
VERSION = 2
SEED = 1234
MAX_DOCS = 1000
CHOICES = 4


@dataclass(frozen=True)
class Doc:
    context: str
    choices: list[str]
    label: int

    def to_json(self) -> str:
        return json.dumps(
            {"context": self.context, "choices": self.choices, "label": self.label},
            ensure_ascii=False,
        )


# -- builders ------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean_sentence(sentence: str) -> bool:
    """A sentence the splitter most likely cut correctly, of a readable length, on one line:
    it ends on a word of 4+ letters or a number (not an abbreviation such as "U.S.")."""
    if not 40 <= len(sentence) <= 250 or sentence[-1] not in ".!?" or "\n" in sentence:
        return False
    last = sentence.split()[-1].rstrip(".!?\"')")
    return last.isdigit() or (len(last) >= 4 and last.isalpha())


def wiki_pairs(text: str) -> list[tuple[str, str]]:
    """``(first sentence, second sentence)`` of every summary (blocks separated by blank
    lines) whose first two sentences split cleanly, separated by one space as in the text."""
    pairs = []
    for block in text.split("\n\n"):
        sentences = _SENTENCE_END.split(block, maxsplit=2)
        if (
            len(sentences) >= 2
            and all(_clean_sentence(s) for s in sentences[:2])
            and block.startswith(f"{sentences[0]} {sentences[1]}")  # one space between them
        ):
            pairs.append((sentences[0], sentences[1]))
    return pairs


_SPEAKER = re.compile(r"^[A-Z][A-Za-z .']{0,28}\.$")


def shakespeare_pairs(text: str, lines: int = 3) -> list[tuple[str, str]]:
    """``(speaker + first ``lines`` lines, next line)`` of every speech (a block whose first
    line is a speaker such as ``HAMLET.`` or ``Ber.``) with at least ``lines + 1`` lines of
    text of 20..80 characters and no stage direction among them."""
    pairs = []
    for block in text.split("\n\n"):
        rows = block.strip("\n").split("\n")
        if len(rows) < lines + 2 or not _SPEAKER.match(rows[0]):
            continue
        verse = rows[1 : lines + 2]
        if all(20 <= len(r.strip()) <= 80 and not r.lstrip().startswith("[") for r in verse):
            pairs.append(("\n".join([rows[0], *verse[:lines]]), verse[lines]))
    return pairs


def multiple_choice(pairs: list[tuple[str, str]], seed: int = SEED) -> list[Doc]:
    """Shuffle ``pairs`` with ``seed``, keep the first :data:`MAX_DOCS`, and give each three
    distractors: the answers of three other pairs (distinct texts), at a random position."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    docs = []
    for i in order[:MAX_DOCS]:
        context, answer = pairs[i]
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            j = rng.randrange(len(pairs))
            other = pairs[j][1]
            if j != i and other != answer and other not in distractors:
                distractors.append(other)
        label = rng.randrange(CHOICES)
        choices = [*distractors[:label], answer, *distractors[label:]]
        docs.append(Doc(context, choices, label))
    return docs


@dataclass(frozen=True)
class LocalTask:
    name: str
    corpus: str
    pairs: Callable[[str], list[tuple[str, str]]]


LOCAL_TASKS = {
    task.name: task
    for task in (
        LocalTask("griffin_wiki_next", "wiki-summaries", wiki_pairs),
        LocalTask("griffin_shakespeare_next", "shakespeare", shakespeare_pairs),
    )
}


def build_docs(name: str) -> list[Doc]:
    """The documents of local task ``name`` from its installed corpus."""
    task = LOCAL_TASKS[name]
    return multiple_choice(task.pairs(load_corpus(task.corpus).text))


def prepare(root: Path, names: list[str] | None = None) -> Path:
    """Write the data (``<name>.jsonl``) and lm-eval YAML of the local tasks ``names``
    (default: all) under ``root/v<VERSION>`` unless already there; return that folder, for
    ``TaskManager(include_path=...)``. Files are written to a temporary name and renamed, so
    concurrent runs never see a half-written file."""
    folder = root / f"v{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else list(LOCAL_TASKS):
        data = folder / f"{name}.jsonl"
        if not data.is_file():
            _write(data, "".join(doc.to_json() + "\n" for doc in build_docs(name)))
        config = folder / f"{name}.yaml"
        template = resources.files(__name__).joinpath(f"{name}.yaml").read_text("utf-8")
        text = template.replace("__DATA_FILE__", json.dumps(str(data.resolve())))
        if not config.is_file() or config.read_text("utf-8") != text:
            _write(config, text)
    return folder


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
