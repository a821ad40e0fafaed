# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap ./.venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo data test test-fast lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# R-CNN at its default small preset on an embedded single-node Ray
demo: $(STAMP)
	$(VENV)/bin/paperline run rcnn

# Fashion-MNIST (70,000 real 28x28 product photos, IDX format) for the `real` presets: Debian's
# dataset-fashion-mnist package where apt-get works, else where to put the four IDX files
FASHION_MNIST := /usr/share/datasets/fashion-mnist
FASHION_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
data:
	@if ls $(FASHION_MNIST)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST is in $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
		&& echo "Fashion-MNIST installed in $(FASHION_MNIST)" \
		|| { echo "apt-get could not install dataset-fashion-mnist. Put the four IDX files"; \
		     echo "($(FASHION_FILES), plain or .gz) into $(FASHION_MNIST) or any directory"; \
		     echo "and pass it as --set data.root=DIR"; exit 1; }; \
	else \
		echo "No apt-get here. Put the four Fashion-MNIST IDX files"; \
		echo "($(FASHION_FILES), plain or .gz) into $(FASHION_MNIST)"; \
		echo "or any directory, and pass it as --set data.root=DIR to the real presets."; \
		exit 1; \
	fi

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
