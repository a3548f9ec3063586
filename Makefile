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
	$(BIN)/pip install -q -e '.[dev,hf,tpu_aot,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxmt.demo --model_dir=$(DEMO_DIR)

# Tests run in TEST_WORKERS pytest-xdist processes (each test file in one; 2 = CI's
# cores; each worker holds 8 fake devices and a few GiB). The notebooks run in smoke mode
# in a real Jupyter kernel on .venv's Python (notebooks/conftest.py sees to both), in the
# same run, so that they fill the workers' gaps.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q -x $(XDIST) --durations=20 --nbmake --nbmake-timeout=600 tests notebooks

# While you work: everything but the tests marked `slow` (end-to-end runs, Hugging Face
# parity, parallelism, multi-host, and any test over about 5 s) and the notebook runs
# (tests/test_notebooks.py still checks their conventions); `make test` runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x $(XDIST) --durations=10 -m "not slow" tests

clean:
	rm -rf $(VENV) runs
