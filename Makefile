# Two entry points for a fresh clone: `make run` (default pipeline) and `make test` (test suite).
# Both create or reuse the virtual environment in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
CORES ?= 2
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint test-slow bench-superpixels bench-msrc bench-msrc-fast bench-msrc-objects report clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup  ## the whole pipeline on the embedded synthetic dataset (config.yaml)
	snakemake --cores $(CORES)

test: setup  ## the default test suite (< 10 min on 2 cores)
	pytest -q -m "not slow"

lint: setup  ## ruff (lint + format), snakefmt and snakemake --lint; CI runs it before the tests
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile workflow/
	snakemake --lint

test-slow: setup  ## end-to-end kill/resume, shards and the Slurm workflow run (minutes)
	pytest -q -m "slow"

bench-superpixels: setup  ## MSRC-21 ingest + superpixel methods table
	weakseg benchmark superpixels --root ../shared/data/msrc21 --out bench

bench-msrc: setup  ## the whole pipeline on MSRC-21 with timings and a quality table
	weakseg benchmark pipeline --config config/msrc21.yaml --out bench

bench-msrc-fast: setup  ## MSRC-21 at half of session 3's time (config/msrc21_fast.yaml), same tables
	weakseg benchmark pipeline --config config/msrc21_fast.yaml --out bench

bench-msrc-objects: setup  ## the same on MSRC-21 objects on background (stuff classes merged into background)
	weakseg benchmark pipeline --config config/msrc21_objects.yaml --out bench

clean:
	rm -rf results .snakemake
