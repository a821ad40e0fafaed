# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap ./.venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# R-CNN at its default small preset on an embedded single-node Ray
demo: $(STAMP)
	$(VENV)/bin/paperline run rcnn

# the whole suite, real Ray included; pytest's "no tests collected" (exit 5) counts as a failure
test: $(STAMP)
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# unit tier only (no Ray start-up)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not cluster"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs store .pytest_cache .ruff_cache
