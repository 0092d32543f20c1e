# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse the venv in $(VENV) and install the package with its test extra into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gcml-installed

ORTHANC_PLUGIN ?= /usr/share/orthanc/plugins/libOrthancDicomWeb.so

.PHONY: install system-deps demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[test]'
	touch $@

# Orthanc 1.10 and its DICOMweb plugin (Debian packages): the real PACS of the tests and `gcml demo --pacs`.
system-deps:
	@if [ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1; then test -e $(ORTHANC_PLUGIN) || MISSING=1; \
	else MISSING=1; fi; \
	if [ -n "$$MISSING" ]; then \
	  echo "installing orthanc and orthanc-dicomweb (apt-get)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends orthanc orthanc-dicomweb; \
	fi

demo: $(STAMP)
	$(BIN)/gcml demo $(DEMO_ARGS)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) system-deps
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf gcml-demo .pytest_cache gcml_app/model gcml_app/lib gcml_app/logs gcml_app/bin
