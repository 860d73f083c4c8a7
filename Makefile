# Two entry points: `make demo` (set up, then check the bundled monitor) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(BIN)/certood check specs/demo.yaml --out runs/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed

# torch 2.14.1 / torchvision 0.29.1 is the pair that imports together here (see FACTS.md in
# the docs). auto-LiRPA 0.3 pins torch<1.13, which no Python 3.11 wheel satisfies: it is
# installed without its dependencies and patched for torch 2 in certood/verifiers/compat.py.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps auto-lirpa==0.3
	touch $@

clean:
	rm -rf $(VENV) runs
