# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse the venv in $(VENV) and install the package with its test extra into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gcml-installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/gcml demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf gcml-demo .pytest_cache gcml_app/model gcml_app/lib gcml_app/logs gcml_app/bin
