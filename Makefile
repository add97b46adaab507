# arcourse: every target bootstraps .venv from requirements.lock the first time.
# Needs only python3 (3.11+) and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.arcourse-installed
ROOT_FLAG := $(shell [ "$$(id -u)" = "0" ] && echo --allow-root)
CELL_TIMEOUT ?= 600
# processes the test targets run side by side (pytest-xdist workers, notebooks graded at once)
JOBS ?= 2
SOLUTIONS := $(wildcard solutions/[0-9][0-9]_*.ipynb)
LEARNER   := $(wildcard notebooks/[0-9][0-9]_*.ipynb)

.PHONY: help lab test test-fast lint unit sync nbval grade book book-quick book-check notebooks lock verify clean

help:
	@echo "make lab        set up (first time) and open JupyterLab on the course"
	@echo "make test       set up (first time) and run everything CI runs"
	@echo "make notebooks  regenerate notebooks/ and the .ipynb pairs from solutions/*.md"
	@echo "make book       build the book site (book/_build/html)"
	@echo "make verify     run every chapter in full mode and check the numbers it claims"
	@echo "                (CHAPTERS=\"03 05\" for some of them, SEED=1 for the second seed,"
	@echo "                QUICK=1 to time the quick mode instead, COLD=1 to time it from an"
	@echo "                empty compilation cache, as a learner's first run)"
	@echo "make lock       re-resolve requirements.lock from pyproject.toml"

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "arcourse needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (arcourse)" >/dev/null
	-$(PY) -m ipykernel install --user --name arcourse --display-name "Python 3 (arcourse)" >/dev/null
	@# JupyterLab as a learner meets it: a chapter's .md opens as a notebook, no news pop-up.
	@mkdir -p $(VENV)/share/jupyter/lab/settings
	@cp tools/lab_overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $(STAMP)
	@echo "environment ready in $(VENV)"

lab: $(STAMP)
	$(BIN)/jupyter lab $(ROOT_FLAG) notebooks/00_welcome.ipynb

# ---- everything CI runs ---------------------------------------------------------------------
# Each notebook executes once: nbval runs the learner copies (writing every check's result to
# build/reports/), the grader runs the solutions (saving them executed, for the book), the
# learner copies' scorecards come from nbval's reports, and the book reuses the executed
# solutions. JAX's persistent compilation cache is shared by all of them.
unit nbval grade book-quick: export JAX_COMPILATION_CACHE_DIR = $(CURDIR)/build/jax-cache
unit nbval grade book-quick: export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS = 0
unit nbval grade book-quick: export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES = 0

test: lint unit sync grade
	$(MAKE) --no-print-directory book-quick book-check
	@echo "make test: all checks passed"

test-fast: lint unit sync
	@echo "make test-fast: lint, unit tests and sync checks passed"

lint: $(STAMP)
	$(BIN)/ruff check arcourse tests tools benchmarks
	$(BIN)/ruff check solutions

unit: $(STAMP)
	ARCOURSE_QUICK=1 $(BIN)/pytest -q -n $(JOBS) tests

sync: $(STAMP)
	$(PY) -m arcourse check-sync

# The learner copies, as learners run them: every cell must run with the exercises unsolved.
# --dist loadfile: all cells of one notebook run in order, in one worker's kernel.
nbval: $(STAMP)
	rm -rf build/reports
	ARCOURSE_QUICK=1 ARCOURSE_PROGRESS=text ARCOURSE_NBVAL_REPORTS=$(CURDIR)/build/reports \
	  $(BIN)/pytest -q -p no:cacheprovider --nbval-lax -n $(JOBS) --dist loadfile \
	  --nbval-cell-timeout=$(CELL_TIMEOUT) $(LEARNER)

# Solutions: executed by the grader as a plain pip install would run it (no extras), full marks
# and no cell raising. Learner copies: zero, scored from what nbval's execution reported.
grade: $(STAMP) nbval
	ARCOURSE_QUICK=1 ARCOURSE_PROGRESS=off $(PY) tools/grade_all.py --jobs $(JOBS) --core-only \
	  --full $(SOLUTIONS) --save-executed build/executed \
	  --zero $(LEARNER) --zero-reports build/reports

book: $(STAMP)
	$(PY) -m arcourse book-chapters
	ARCOURSE_PROGRESS=off $(BIN)/jupyter-book build book --warningiserror --keep-going

# CI's book: the solution notebooks `make grade` just executed (quick mode) are reused as they are.
book-quick: $(STAMP)
	$(PY) -m arcourse book-chapters --executed build/executed
	ARCOURSE_QUICK=1 ARCOURSE_PROGRESS=off $(BIN)/jupyter-book build book --warningiserror --keep-going

book-check: $(STAMP)
	$(PY) tools/check_book.py

notebooks: $(STAMP)
	$(PY) -m arcourse notebooks

# SEED=1 re-runs every chapter with the course-wide seed offset (each claim must hold at two seeds)
SEED ?= 0
# QUICK=1 runs the chapters in quick mode instead and judges only their run time (<= 30 s each)
verify: $(STAMP)
	ARCOURSE_SEED=$(SEED) $(PY) -m arcourse verify $(if $(QUICK),--quick) $(if $(COLD),--cold) $(CHAPTERS)

lock: $(STAMP)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra lab --extra dev --extra book \
	  --python-version 3.11 -o requirements.lock

clean:
	rm -rf book/_build book/chapters build .pytest_cache
