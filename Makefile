# `make test` and `make demo` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint test test-fast demo docs results bench bench-train bench-substitution tune-labels-only tune-best-run tune-levers tune-onset bench-sd15 bench-gpu clean

install: $(VENV)/.installed

# CPU torch first, pinned by constraints.txt, so no other dependency can pull a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

# ruff's rules and settings are in pyproject.toml ([tool.ruff]).
lint: install
	$(BIN)/ruff check .

# The test files side by side, one pytest-xdist worker per core, each file whole on one worker so that its shared
# fixtures are built once; TEST_JOBS=0 runs them all in one process.
TEST_JOBS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The docs site (mkdocs.yml, Material theme) into site/; the CLI reference is rendered from the typer app.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Every measured table in README.md and docs/ rendered again from its JSON in docs/results/.
results: install
	$(BIN)/python docs/results.py

DEMO := runs/demo
SEED ?= 0
# The shapes world with the toy teacher in data/toy-sd: write the limited split and a small balanced prompt bank
# (4 prompts of each shape-colour pair), then encode -> teacher-label (the teacher's own samples of the bank, 6 a
# prompt, as extra records) -> train a student with the teacher and one without, side by side, each cross-attending
# to the first 24 text positions (the world's captions take 18 at most) -> sample (10 DDIM steps), score, curves.
# `make demo SEED=1` draws another split, other labels, other students and other samples.
demo: install
	rm -rf $(DEMO)
	$(BIN)/sdit bench distill --out $(DEMO) --runs no_teacher,kd_synth --bank-per-pair 4 --synth-samples 6 \
		--text-positions 24 --steps 1500 --lr 3e-3 --per-prompt 2 --sample-steps 10 --curve-points 5 \
		--curve-prompts 1 --seed $(SEED) --json $(DEMO)/figures.json

bench: install
	$(BIN)/sdit bench startup --json runs/bench-startup.json
	$(BIN)/sdit bench encode --json runs/bench-encode.json
	$(BIN)/sdit bench ray-encode --json runs/bench-ray-encode.json
	$(BIN)/sdit bench label --json runs/bench-label.json
	$(MAKE) bench-train
	$(BIN)/sdit bench sample --json runs/bench-sample.json
	$(BIN)/sdit bench distill --json runs/bench-distill.json

# bench train, with the loader's supply measured on local disk and on a local S3-compatible endpoint (moto's server,
# from the test extras), as a cluster reads a store on object storage.
S3_PORT ?= 5555
BENCH_TRAIN_JSON ?= runs/bench-train.json
S3_ENV := AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1 \
	AWS_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT)
bench-train: install
	$(BIN)/moto_server -p $(S3_PORT) >/dev/null 2>&1 & trap "kill $$!" EXIT; sleep 3; \
	$(S3_ENV) $(BIN)/python -c "import s3fs; s3fs.S3FileSystem().mkdir('sdit-bench')" && \
	$(S3_ENV) $(BIN)/sdit bench train --supply-at local --supply-at s3://sdit-bench/supply --json $(BENCH_TRAIN_JSON)

# How many records the teacher is worth: bench distill's no_teacher and kd_perturb at 250 to 4,000 records.
bench-substitution: install
	$(BIN)/sdit bench substitution --json runs/substitution.json

# The README's labels-only tuning table: variants of kd_perturb on bench distill's split and store.
tune-labels-only: install
	$(BIN)/sdit bench distill --runs "" --variants docs/tuning/labels-only.toml --curve-points 0 \
		--out runs/labels-only --json runs/labels-only.json

# The README's best run pushed: kd_synth with twice the steps.
tune-best-run: install
	$(BIN)/sdit bench distill --runs "" --variants docs/tuning/best-run.toml --curve-points 0 \
		--out runs/best-run --json runs/best-run.json

# The levers at equal teacher cost: labels only, trajectory draws, the teacher's samples, guidance-distilled students.
tune-levers: install
	$(BIN)/sdit bench distill --runs no_teacher,kd_perturb,kd_synth,kd_traj --variants docs/tuning/levers.toml \
		--curve-points 0 --per-prompt 2 --out runs/levers --json runs/levers.json

# What delays the students' first shapes: the demo's runs with one change at a time, a curve point every 100 steps.
tune-onset: install
	$(BIN)/sdit bench distill --runs no_teacher,kd_synth --variants docs/tuning/onset.toml --bank-per-pair 4 \
		--synth-samples 3 --steps 900 --lr 3e-3 --per-prompt 2 --sample-steps 20 --curve-points 9 --curve-prompts 1 \
		--out runs/onset --json runs/onset.json

# SD 1.5's architecture with random weights at 512 px: every stage, the students' speed against the teacher's.
bench-sd15: install
	$(BIN)/sdit bench sd15 --json runs/bench-sd15.json

# The same on one GPU at real batch sizes, plus labels/s and train steps/s of S/2 to XL/2 (scripts/gpu-check.sh runs
# it in parts on a GPU machine without network).
bench-gpu: install
	$(BIN)/sdit bench sd15 --device cuda --out runs/bench-sd15-gpu --json runs/bench-sd15-gpu.json

clean:
	rm -rf $(VENV) runs build *.egg-info
