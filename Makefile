# Set-up contract: `make demo` and `make test` each build .venv from nothing when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test test-fast venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,hf,tpu_aot]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxmt.demo --model_dir=$(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

# While you work: everything but the tests marked `slow` (end-to-end runs, notebooks,
# Hugging Face parity, parallelism, multi-host, and any test over about 5 s); `make test`
# runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10 -m "not slow" tests

clean:
	rm -rf $(VENV) runs
