# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is what these CI machines carry; on a CUDA machine set TORCH_SPEC="torch>=2.5".
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m fasttune demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

gpu-test: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

.PHONY: install demo test gpu-test
