# `make demo` and `make test` do all the set-up on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKENDS := tensorflow jax torch
LINTED := keras_lsuv tests examples benchmarks scripts
# The backend whose unit run measures coverage, and the floor it must meet (percent of keras_lsuv's lines).
COVERAGE_BACKEND := jax
COVERAGE_FLOOR := 93
# `make test-min`: a fresh venv with the lowest versions setup.cfg declares, and the backend it runs.
MIN := build/min
MIN_BACKEND := jax

.PHONY: demo test lint typecheck docs unit distribution multiprocess package test-min report-figure bench-quick \
	bench study-quick study sweep clean

$(STAMP): setup.cfg pyproject.toml requirements/dev.txt requirements/sweep.txt requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c requirements/constraints.txt -r requirements/dev.txt
	# keras-hub (tests/sweep) without its declared dependencies, which would pull a second TensorFlow (the full
	# tensorflow, through tensorflow-text) beside tensorflow-cpu; requirements/sweep.txt lists what it imports.
	$(BIN)/python -m pip install --no-deps -c requirements/constraints.txt -r requirements/sweep.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Lint, type check, docs, the suite once per backend (separate processes, with coverage on one), distribution and
# multi-process tests, the wheel smoke test and twine check, the suite on the lowest declared versions, then a
# benchmark smoke run and a slice of the study.
test: lint typecheck docs unit distribution multiprocess package test-min bench-quick study-quick

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# mypy, strict on keras_lsuv (configured in setup.cfg).
typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir build/site

# The COVERAGE_BACKEND run also reports keras_lsuv's line coverage and fails below COVERAGE_FLOOR.
unit: $(STAMP)
	@failed=""; for backend in $(BACKENDS); do \
		echo "=== pytest, KERAS_BACKEND=$$backend"; \
		coverage=""; if [ $$backend = $(COVERAGE_BACKEND) ]; then \
			coverage="--cov=keras_lsuv --cov-report=term-missing:skip-covered --cov-fail-under=$(COVERAGE_FLOOR)"; fi; \
		KERAS_BACKEND=$$backend $(BIN)/python -m pytest tests -p no:cacheprovider -q \
			--ignore=tests/distribution --ignore=tests/multiprocess $$coverage || failed="$$failed $$backend"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED backends:$$failed"; exit 1; fi

# Device flags are read at start-up, so each backend's distribution tests run in a process of their own.
distribution: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=4 KERAS_BACKEND=jax \
		$(BIN)/python -m pytest tests/distribution -p no:cacheprovider -q
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest tests/distribution -p no:cacheprovider -q

# Each test process starts 2 worker processes on localhost (JAX: keras.distribution; TF: MultiWorkerMirroredStrategy).
multiprocess: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python -m pytest tests/multiprocess -p no:cacheprovider -q
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest tests/multiprocess -p no:cacheprovider -q

# Imports keras_lsuv from the smoke venv (run in build/, so not from the checkout) and draws one kernel.
SMOKE_TEST = cd build && KERAS_BACKEND=jax smoke/bin/python -c "import keras_lsuv, keras; \
	assert '/build/smoke/' in keras_lsuv.__file__, keras_lsuv.__file__; \
	w = keras.ops.convert_to_numpy(keras_lsuv.Orthonormal(seed=0)((8, 4))); \
	assert abs((w.T @ w) - __import__('numpy').eye(4)).max() < 1e-5; \
	print('smoke test: keras_lsuv', keras_lsuv.__version__, 'from', keras_lsuv.__file__)"

# Builds the wheel and sdist; in a fresh venv, runs the README's install line as written, then installs the wheel
# over it, importing the package after each.
package: $(STAMP)
	rm -rf dist build/smoke && mkdir -p build
	$(BIN)/python -m build --outdir dist . > build/package.log 2>&1 || (cat build/package.log; exit 1)
	# Metadata and README rendering, checked as PyPI would.
	$(BIN)/twine check --strict dist/*
	$(PYTHON) -m venv build/smoke
	# The README's install line (its [jax] extra: the lightest of the three backends), verbatim, from the
	# repository root with the smoke venv's pip first on PATH and the versions requirements/constraints.txt pins.
	line="$$($(BIN)/python scripts/readme_install.py README.md)" && echo "README: $$line" && \
		PATH="$(CURDIR)/build/smoke/bin:$$PATH" PIP_CONSTRAINT="$(CURDIR)/requirements/constraints.txt" PIP_QUIET=1 \
		sh -c "$$line"
	$(SMOKE_TEST)
	build/smoke/bin/python -m pip install -q --no-deps --force-reinstall "$$(ls dist/*.whl)"
	$(SMOKE_TEST)

# The unit suite in a fresh venv holding the lowest keras, numpy and MIN_BACKEND versions setup.cfg declares
# (installed from PyPI): fails the moment a lower bound stops being true. The test tools are not pinned; the files
# that need torch, TensorFlow, scikit-learn or mnist1d are left out or skip.
test-min: $(STAMP)
	rm -rf $(MIN) && mkdir -p build
	$(PYTHON) -m venv $(MIN)
	$(BIN)/python scripts/lowest_requirements.py $(MIN_BACKEND) --python-version \
		"$$($(MIN)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" > $(MIN)/constraints.txt
	$(MIN)/bin/python -m pip install -q -c $(MIN)/constraints.txt ".[$(MIN_BACKEND)]" pytest hypothesis
	KERAS_BACKEND=$(MIN_BACKEND) $(MIN)/bin/python -c "import keras, numpy; \
		print('test-min: keras', keras.__version__, 'numpy', numpy.__version__, 'on', keras.backend.backend())"
	KERAS_BACKEND=$(MIN_BACKEND) $(MIN)/bin/python -m pytest tests -p no:cacheprovider -q \
		--ignore=tests/distribution --ignore=tests/multiprocess --ignore=tests/test_data.py --ignore=tests/test_examples.py

# tests/sweep in full: every model on every backend, fit compiled (`make test` runs a slice: each model on one
# backend), then the "Models tested" table of docs/guide.md rendered from the results in build/sweep.
sweep: $(STAMP)
	@rm -rf build/sweep; failed=""; for backend in $(BACKENDS); do \
		echo "=== sweep, KERAS_BACKEND=$$backend"; \
		LSUV_SWEEP=full LSUV_SWEEP_RESULTS=build/sweep/$$backend.json KERAS_BACKEND=$$backend \
			$(BIN)/python -m pytest tests/sweep -p no:cacheprovider -q || failed="$$failed $$backend"; \
	done; \
	$(BIN)/python scripts/sweep_table.py build/sweep docs/guide.md; \
	if [ -n "$$failed" ]; then echo "FAILED backends:$$failed"; exit 1; fi

# Rewrites docs/img/report.png, the LSUVReport.plot() figure of docs/guide.md.
report-figure: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python scripts/report_figure.py

# Every benchmark section on tiny models, one repetition per backend: checks benchmarks/run.py runs (writes nothing).
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# The full benchmark: prints the report and writes docs/benchmarks.md. The page's run (`--repeats 1 --real-models
# all`) took 46 minutes on 2 CPU cores, most of it the first-call section's 153 fresh processes (27 of them anyinit's,
# run where it is installed).
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Small slices of examples/deep_thin_nets.py, examples/residual_nets.py and examples/optimizers.py (under 2 minutes
# on 2 CPU cores).
study-quick: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python examples/deep_thin_nets.py --quick
	KERAS_BACKEND=jax $(BIN)/python examples/residual_nets.py --quick
	KERAS_BACKEND=jax $(BIN)/python examples/optimizers.py --quick

# The full study behind docs/results.md (about 60 minutes on 2 CPU cores for the first two parts, and 70 for the third:
# 43 on JAX, 14 on TensorFlow, 13 on PyTorch); rewrites the plots in docs/img. The `anyinit` rows of the residual and
# optimizer parts need `pip install anyinit==0.4.0` (they are skipped without it).
study: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python examples/deep_thin_nets.py --results-json build/study.json --plots-dir docs/img
	KERAS_BACKEND=jax $(BIN)/python examples/residual_nets.py --results-json build/residual_jax.json
	KERAS_BACKEND=tensorflow $(BIN)/python examples/residual_nets.py --networks resnet \
		--results-json build/residual_tensorflow.json
	KERAS_BACKEND=torch $(BIN)/python examples/residual_nets.py --networks resnet --results-json build/residual_torch.json
	KERAS_BACKEND=jax $(BIN)/python examples/residual_nets.py --real-models-only
	KERAS_BACKEND=jax $(BIN)/python examples/optimizers.py --results-json build/optimizers_jax.json
	KERAS_BACKEND=tensorflow $(BIN)/python examples/optimizers.py --networks resnet \
		--results-json build/optimizers_tensorflow.json
	OMP_NUM_THREADS=1 KERAS_BACKEND=torch $(BIN)/python examples/optimizers.py --networks resnet \
		--results-json build/optimizers_torch.json

clean:
	rm -rf $(VENV) build dist site *.egg-info .mypy_cache .coverage
