# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the
# project (with its test extra) when needed, so .venv/bin/aot exists afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AOT := $(VENV)/bin/aot
STAMP := $(VENV)/.installed-stamp
DEMO := build/demo

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) tools/tiny_checkpoint.py $(DEMO)/ckpt
	$(AOT) build --checkpoint $(DEMO)/ckpt --quant 8da4w --max-seq-len 32 --max-context-len 256 \
		--out $(DEMO)/bundle --force
	$(AOT) inspect $(DEMO)/bundle
	$(PY) tools/generate.py $(DEMO)/bundle "def load(fp, *, cls=None):"

bench: $(STAMP)
	$(PY) bench/build_1b.py --preset

clean:
	rm -rf build $(VENV)
