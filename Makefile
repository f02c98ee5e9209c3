# Two commands do all set-up on a fresh machine: `make train` and `make test`. Both create
# .venv if it is missing and install the package into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

WORKDIR ?= workdir/default
# Extra flags for `make train` / `make bench`, e.g. TRAIN_ARGS='--config.num_train_steps=20'
# (tests/test_readme.py runs both with tiny ones).
TRAIN_ARGS ?=
BENCH_ARGS ?=

.PHONY: train test lint format bench clean venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The default experiment (built-in translation corpus) on CPU; rerunning resumes from WORKDIR.
train: $(STAMP)
	$(PY) experiments/train.py --config=experiments/configs/default.py --workdir=$(WORKDIR) $(TRAIN_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/attention.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
