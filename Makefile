# Two entry points: `make demo` and `make test`. Each creates .venv on first use and reuses it.
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
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV)
