# kdjax make targets. Every target sets itself up: a virtualenv in $(VENV)
# with kdjax installed in editable mode plus the test extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Real MNIST (IDX files). The sibling ../shared/data/mnist is used when present.
KDJAX_DATA_DIR ?= $(abspath ../shared/data/mnist)
export KDJAX_DATA_DIR
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: help venv test test-all lint docs test-lowest demo bench gpu-carry clean

help:
	@echo "make venv   - create $(VENV) and install kdjax[test] (done by every target)"
	@echo "make test   - the unit tier (pytest -m 'not integration', 2 workers)"
	@echo "make test-all - both tiers: unit and integration (pipelines, examples, notebook, kill/resume, subprocesses)"
	@echo "make lint   - ruff check the whole tree (the rules are in pyproject.toml)"
	@echo "make docs   - the API reference (Sphinx, warnings are errors) in docs/_build/html"
	@echo "make test-lowest - the test suite against the lowest versions pyproject.toml allows (.venv-lowest)"
	@echo "make demo   - distill an MNIST student from a teacher (quick config, CPU)"
	@echo "make bench  - loss and train-step micro-benchmarks (JSON under benchmarks/results/)"
	@echo "make gpu-carry - wheels and MNIST for experiments/mnist/gpu_session.sh on a lent GPU"
	@echo "make clean  - remove $(VENV), runs/ and caches"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The unit tier: no subprocess, no training on real data beyond a few steps.
test: venv
	$(PY) -m pytest -n 2 -q -m "not integration" $(PYTEST_ARGS) tests kdjax

# Both tiers (what CI runs): adds the pipelines, examples, notebook,
# kill/resume, multi-process, README and rerun tests, and more examples of
# the property tests (the "thorough" hypothesis profile, conftest.py).
test-all: venv
	$(PY) -m pytest -n 2 -q --hypothesis-profile=thorough $(PYTEST_ARGS) tests kdjax

# Lint only: `ruff format` is configured (pyproject.toml) but not enforced.
lint: venv
	$(PY) -m ruff check .

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

# A fresh build (-E) every time, so that every docstring warning is shown.
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

# The lower bounds in pyproject.toml are tested, not guessed: uv resolves
# every direct dependency to the lowest version they allow.
test-lowest: venv
	$(PY) -m pip install -q uv
	rm -rf .venv-lowest
	$(VENV)/bin/uv venv -q --python $(PYTHON) .venv-lowest
	$(VENV)/bin/uv pip install -q --python .venv-lowest/bin/python --resolution lowest-direct -e '.[test]'
	$(VENV)/bin/uv pip list --python .venv-lowest/bin/python | grep -i -E '^(jax|jaxlib|flax|optax|chex|orbax-checkpoint|numpy|ml-collections|tensorflow-datasets|tqdm|matplotlib|grain) '
	.venv-lowest/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) tests kdjax

demo: venv
	$(PY) -m experiments.mnist.main --config=experiments/mnist/configs/quick.py --workdir=$(WORKDIR)

bench: venv
	$(PY) benchmarks/losses.py --json benchmarks/results/losses_cpu.json
	$(PY) benchmarks/train_step.py --backend cpu --batch-size 128 --json benchmarks/results/train_step_cpu.json

# What experiments/mnist/gpu_session.sh needs on an offline accelerator image
# (git-ignored folders, to be carried there; never committed).
gpu-carry: venv
	@ls "$(KDJAX_DATA_DIR)"/train-images-idx3-ubyte* >/dev/null 2>&1 || { echo "no MNIST IDX files in $(KDJAX_DATA_DIR): set KDJAX_DATA_DIR" >&2; exit 1; }
	mkdir -p .whl .mnist
	rm -f .whl/ml_collections-*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl "ml_collections==$$($(PY) -c 'import importlib.metadata as m; print(m.version("ml_collections"))')"
	cp "$(KDJAX_DATA_DIR)"/*-ubyte* .mnist/

clean:
	rm -rf $(VENV) .venv-lowest runs .pytest_cache .hypothesis docs/_build
