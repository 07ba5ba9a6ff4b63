# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH is the torch requirement installed before anything else (a CPU wheel of 2.13.0 on
# our build machines); `make test TORCH=` skips it and keeps whatever torch the venv has.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

# The torch installed first (or the venv's own) is pinned by a constraints file while the rest
# installs: a package that asks for another torch fails instead of pulling a multi-GB build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install "$(TORCH)"; fi
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[dev,examples]"
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

demo: setup
	$(PY) examples/demo.py --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py --write

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs lightning_logs .tmp .pytest_cache
