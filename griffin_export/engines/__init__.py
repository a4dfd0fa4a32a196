"""Other inference engines: GGUF files for llama.cpp, written by its own converter in a child
process."""
