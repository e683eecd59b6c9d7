# The two set-up commands (README): `make repro` runs the whole DAG, `make test` runs the tests.
# Both create .venv and install the pinned environment on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser repro test test-fast interop

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	# lmms-eval's own SLAKE scoring code, for the export round trip (its declared deps would pull torchvision)
	$(BIN)/python -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

repro: install
	$(BIN)/dvc repro
	$(BIN)/vital summary

# the annotation app's browser test drives Debian's headless Chromium through chromium-driver
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

test: install browser
	VITAL_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# LLaMA-Factory and LLaVA load the release with their own code, each in a venv of its own pins (interop/interop.mk)
interop:
	@$(MAKE) --no-print-directory -f interop/interop.mk interop
