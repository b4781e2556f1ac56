# deepfleet: `make demo` trains the built-in model on 2 local CPU ranks; `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev demo test test-unit fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepfleet demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The property-based fuzz tests of every input parser, with many more examples than `make test` runs.
fuzz: $(STAMP)
	DEEPFLEET_HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/unit -k fuzz -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
