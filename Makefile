# One command to set up and run the demo, one to set up and run the tests.
#   make demo    sets up .venv, makes a synthetic SWI case, detects microbleeds, prints the summary
#   make test    sets up .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test benchmark clean

setup: $(VENV)/.installed

# torch first: `pip install torch==2.13.0` takes the CPU build that lies on this machine's
# disk; a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/cmbdetect synth --n 1 --controls 0 --seed 2022 --out demo/data
	$(BIN)/cmbdetect detect demo/data/images -o demo/results --preview

test: setup
	$(BIN)/python -m pytest -q

benchmark: setup
	$(BIN)/cmbdetect benchmark

clean:
	rm -rf $(VENV) demo
