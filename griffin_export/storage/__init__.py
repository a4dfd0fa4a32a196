"""Checkpoints in and out. Knows nothing of GRIFFIN's selection.

* ``sources``: what ``--model`` names (a local directory, a GGUF file, a hub id, the embedded
  model), resolved to a local safetensors directory (GGUF converted once and cached).
* ``loading``: the checks made before weights load, the model, its tokenizer and generation
  config, ``--dtype`` names and the one ``--device`` check.
* ``safetensors_io``: every safetensors read (one reader class) and write (shards, headers).
* ``fingerprint``: sampled weight fingerprints and file hashes.
* ``atomic``: output directories that appear complete or not at all.
* ``jsonfile``: the one reader of a directory's JSON files.
"""
