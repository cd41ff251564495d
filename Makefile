# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   — create .venv, install, run the main job on the built-in data
#   make test   — create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# microsoft-aurora imports timm, which imports torchvision: the pair must match.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test,simulate]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/weatherpeft demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
