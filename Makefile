# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the
# project (with its test extra) when needed, so .venv/bin/aot exists afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AOT := $(VENV)/bin/aot
STAMP := $(VENV)/.installed-stamp
DEMO := build/demo

.PHONY: install test test-all test-fast demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two workers (pytest-xdist), a test file each at a time: the suite is mostly single-threaded
# lowering, so two cores take it in about half the time (session fixtures build once per run,
# shared by the workers: tests/conftest.py). CI's tier: everything but the tests marked heavy
# (further builds re-checking a memory optimization's bytes, vision int4/int8 and two NPU
# recipes; pyproject.toml's markers), which test-all adds.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not heavy" --durations=30

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# Unit tests, no lowering: everything not marked slow (tests/conftest.py marks every test that
# builds a bundle). The other tiers by marker: pytest -m oracle, pytest -m e2e.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(AOT) build --model demo --quant 8da4w --out $(DEMO)/bundle --force
	$(AOT) validate $(DEMO)/bundle --max-ppl-ratio 1.05 --min-top1 0.85 --max-kl 0.05
	$(AOT) run $(DEMO)/bundle --prompt "def fibonacci(n):" --max-new-tokens 64
	$(AOT) build --model demo-instruct --out $(DEMO)/instruct --force
	$(AOT) run $(DEMO)/instruct --chat --prompt "Write a Python function that adds two numbers." --max-new-tokens 64
	$(AOT) run $(DEMO)/instruct --chat --prompt "What's the weather in Paris?" --tools aot/demo/instruct/tools.json

bench: $(STAMP)
	$(PY) bench/build_1b.py --preset

clean:
	rm -rf build $(VENV)
