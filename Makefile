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
# The shapes world with the toy teacher in data/toy-sd: write the limited split and the prompt bank, then
# encode -> teacher-label -> train (a student with the teacher, and one without) -> sample and score.
demo: install
	rm -rf $(DEMO)
	$(BIN)/sdit bench distill --out $(DEMO) --runs no_teacher,kd_perturb --records 1000 --draws 8 \
		--steps 400 --per-prompt 1 --sample-steps 20 --json $(DEMO)/figures.json

bench: install
	$(BIN)/sdit bench encode --json runs/bench-encode.json
	$(BIN)/sdit bench label --json runs/bench-label.json
	$(BIN)/sdit bench train --json runs/bench-train.json
	$(BIN)/sdit bench sample --json runs/bench-sample.json
	$(BIN)/sdit bench distill --json runs/bench-distill.json

clean:
	rm -rf $(VENV) runs build *.egg-info
