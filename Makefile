# Two entry points: `make demo` and `make test`. Each creates .venv on first use and reuses it.
# `make test` runs the suite in 2 processes (pytest-xdist, one test file per process at a time:
# module fixtures are built once); XLA compilation, which dominates, is single-threaded.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,torch]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/amg demo

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV)
