# `make test` and `make demo` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

# CPU torch first, pinned by constraints.txt, so no other dependency can pull a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

DEMO := runs/demo
demo: install
	rm -rf $(DEMO)
	$(BIN)/python -m sdit.tiny $(DEMO)/teacher
	$(BIN)/sdit encode data/samples --teacher $(DEMO)/teacher --out $(DEMO)/store --resolution 64 \
		--prompts data/demo_prompts.txt
	$(BIN)/sdit teacher-label $(DEMO)/store --teacher $(DEMO)/teacher --draws 4
	@echo "store: $(DEMO)/store (rejected inputs: $(DEMO)/store/rejects.jsonl; labels: $(DEMO)/store/labels/default)"

bench: install
	$(BIN)/sdit bench encode --json runs/bench-encode.json
	$(BIN)/sdit bench label --json runs/bench-label.json

clean:
	rm -rf $(VENV) runs build *.egg-info
