"""What the ablation scripts share: the window options and the model + windows they start
from (``griffin ppl --protocol griffin``'s windows: L tokens, the first P the prompt)."""

from __future__ import annotations

import argparse

import torch

from griffin_export.evaluation.corpora import bos_token, corpus_tokens, load_corpus
from griffin_export.evaluation.protocols import Window, make_windows
from griffin_export.storage.loading import LoadedModel, load_model
from griffin_export.storage.sources import resolve_source


def add_window_args(ap: argparse.ArgumentParser) -> None:
    """``--dataset``, ``-L/--seq-len``, ``-P/--prompt-len``, ``--max-windows``, ``--threads``."""
    ap.add_argument("--dataset", default="wiki-summaries")
    ap.add_argument("-L", "--seq-len", type=int, default=1024)
    ap.add_argument("-P", "--prompt-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)


def load_windows(
    model: str, args: argparse.Namespace, *, with_bos: bool = False
) -> tuple[LoadedModel, list[Window]]:
    """Set torch's threads, load ``model`` in float32 on the CPU and cut ``args.dataset`` into
    ``args.max_windows`` windows of ``args.seq_len`` scored from ``args.prompt_len`` (each
    opening with the model's BOS when ``with_bos`` and its tokenizer starts texts with one)."""
    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_source(model), torch.float32, "cpu")
    if loaded.tokenizer is None:
        raise SystemExit(f"{model} has no tokenizer")
    corpus = load_corpus(args.dataset)
    bos = bos_token(loaded.tokenizer) if with_bos else None
    tokens = corpus_tokens(loaded.tokenizer, corpus.text, args.seq_len * args.max_windows)
    windows = make_windows(tokens, args.seq_len, None, args.max_windows, args.prompt_len, bos)
    return loaded, windows
