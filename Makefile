# Two commands: `make demo` (set up, then run the embedded demo job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(VENV)/bin/pip install --disable-pip-version-check -q

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch is pinned in the same pip command so pip takes the CPU wheel, not a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0 -e '.[cpu,dev]'
	touch $@

demo: setup
	$(VENV)/bin/lvd demo --out lvd-demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/embed.py && $(PY) benchmarks/curation.py --n 200000 && $(PY) benchmarks/shards.py && $(PY) benchmarks/scale.py && $(PY) benchmarks/pretrain.py
