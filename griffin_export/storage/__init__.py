"""Checkpoints in and out: finding and loading sources (local directory, GGUF, hub id, the
embedded model), safetensors reading and writing, weight fingerprints and atomic output
directories. Knows nothing of GRIFFIN's selection."""
