# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   — create .venv, install, run the main job on the built-in data
#   make test   — create .venv, install, run the whole test suite
# Versions come from constraints.txt (the whole resolved set, torch included); `make lock`
# re-resolves the project's ranges in a scratch venv and rewrites it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
# microsoft-aurora imports timm, which imports torchvision: the pair must match.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[test,simulate,grib]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/weatherpeft demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples docs
	$(BIN)/python -m pytest -q

lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet $(TORCH_SPEC)
	build/lock-venv/bin/pip install --quiet '.[test,simulate,grib]'
	{ sed -n '/^#/p' $(LOCK); build/lock-venv/bin/pip freeze --exclude weatherpeft; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf build/lock-venv

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
