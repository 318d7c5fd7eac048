# `make demo` and `make test` each work on a fresh clone: both create (or reuse) .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fico-installed
LMMS_STAMP := $(VENV)/.fico-lmms-installed

.PHONY: demo test lmms bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# lmms-eval for `fico eval` and `lmms-eval --model fico`: its minimal pinned set into the same
# venv. torch is repeated so pip never swaps the CPU wheel; lmms-eval goes in with --no-deps
# (requirements-lmms.txt says why).
$(LMMS_STAMP): $(STAMP) requirements-lmms.txt
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -r requirements-lmms.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps lmms-eval==0.7.3
	touch $(LMMS_STAMP)

lmms: $(LMMS_STAMP)

demo: $(STAMP)
	$(BIN)/fico run fastv

# lint-imports checks the architecture's contracts (pyproject.toml, docs/architecture.md)
test: $(STAMP) $(LMMS_STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m fico.benchmarks.fastv_attention --write docs/benchmarks.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis .import_linter_cache .grimp_cache
