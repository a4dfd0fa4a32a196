#!/usr/bin/env bash
# The perplexity figures in docs/results.md: embedded SmolLM2 (fp32), P=512, L=1024, 8 windows.
# Usage: bash benchmarks/ppl_grid.sh   (about 20 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
griffin=.venv/bin/griffin
grid=(--protocol griffin -L 1024 -P 512 --max-windows 8 --baselines magnitude,random
      --ratio 0.25 --ratio 0.5 --ratio 0.75 --ratio 0.9 --refresh 0 --refresh 64)
$griffin ppl --dataset wiki-summaries "${grid[@]}" --json > "$out/ppl-wiki-summaries.json"
$griffin ppl --dataset shakespeare "${grid[@]}" --json > "$out/ppl-shakespeare.json"
# The long-generation case refresh exists for: a short prompt, a long continuation.
$griffin ppl --dataset wiki-summaries --protocol griffin -L 1024 -P 128 --max-windows 8 \
  --ratio 0.5 --ratio 0.75 --refresh 0 --refresh 64 --window 128 --json > "$out/ppl-long-wiki.json"
