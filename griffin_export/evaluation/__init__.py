"""Measuring exports: perplexity protocols (shared by ``griffin ppl`` and ``griffin eval``),
corpora, task accuracy through lm-evaluation-harness, and what ``griffin inspect`` shows."""
