# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

# Two workers, each test file on one of them (module-scoped fixtures such as x64 stay within a file).
PYTEST_FLAGS ?= -n 2 --dist loadfile
# The multi-device tests run in a process of their own: 8 simulated CPU devices, set before JAX starts.
SPMD_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo examples test test-newest lint docs bench bench-quick bench-peers bench-scale bench-planner graphviz fashion-mnist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(VENV)/.bench: $(VENV)/.core
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

$(VENV)/.demo: $(VENV)/.core
	$(BIN)/pip install -q -e ".[demo]"
	touch $@

$(VENV)/.examples: $(VENV)/.core
	$(BIN)/pip install -q -e ".[examples]"
	touch $@

$(VENV)/.lint: $(VENV)/.core
	$(BIN)/pip install -q -e ".[lint]"
	touch $@

$(VENV)/.docs: $(VENV)/.core
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

# Graphviz draws plan pictures; without it curvplan falls back to matplotlib.
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing graphviz (apt) for plan pictures"; \
	    (apt-get install -y -qq graphviz >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1)) || \
	    echo "note: graphviz could not be installed; plan pictures use matplotlib"; \
	  else echo "note: graphviz (dot) not found; plan pictures use matplotlib"; fi; }

demo: $(VENV)/.demo graphviz
	$(BIN)/python -m curvplan.examples.digits

test: $(VENV)/.test graphviz
	@$(BIN)/python -c "import sys, jax, jaxlib, optax; print(f'curvplan tests: Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax {optax.__version__}')"
	$(BIN)/python -m pytest $(PYTEST_FLAGS) tests curvplan --ignore=tests/spmd
	$(SPMD_ENV) $(BIN)/python -m pytest -n 2 tests/spmd

# The suite again on the newest JAX: a second venv on the newest Python that pyenv (or PATH) has, with the
# newest jax / jaxlib / optax / flax / equinox that pip resolves. Without such a Python it prints a note.
NEWEST_VENV := .venv-newest
NEWEST_PYTHON ?= $(shell for v in 3.13 3.12; do \
	  p=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -1); \
	  [ -n "$$p" ] || p=$$(command -v python$$v 2>/dev/null); [ -n "$$p" ] && "$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; \
	done)

$(NEWEST_VENV)/.test: pyproject.toml
	@test -n "$(NEWEST_PYTHON)" || { echo "note: no Python 3.12 / 3.13 found"; exit 1; }
	"$(NEWEST_PYTHON)" -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/pip install -q --upgrade -e ".[test]"
	touch $@

test-newest: graphviz
	@if [ -z "$(NEWEST_PYTHON)" ]; then \
	  echo "note: no Python 3.12 or 3.13 on this machine (pyenv or PATH): the newest-JAX run is skipped"; \
	else \
	  $(MAKE) --no-print-directory $(NEWEST_VENV)/.test && \
	  $(NEWEST_VENV)/bin/python -c "import sys, jax, jaxlib, optax; print(f'curvplan tests: Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax {optax.__version__}')" && \
	  $(NEWEST_VENV)/bin/python -m pytest $(PYTEST_FLAGS) tests curvplan --ignore=tests/spmd && \
	  $(SPMD_ENV) $(NEWEST_VENV)/bin/python -m pytest -n 2 tests/spmd; \
	fi

# Every script in examples/ at full size (each also runs small in the test suite).
examples: $(VENV)/.examples
	@for f in examples/flax_nnx.py examples/equinox_mlp.py examples/grad_accumulation.py examples/char_lm.py \
	  examples/least_squares.py examples/orbax_checkpoint.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Static checks: ruff's pyflakes / pycodestyle / import-order / bugbear / pyupgrade rules (pyproject.toml).
lint: $(VENV)/.lint
	$(BIN)/ruff check curvplan tests benchmarks examples docs

# The API reference (mkdocs + mkdocstrings) into build/site; strict: a docstring that does not parse fails.
docs: $(VENV)/.docs
	$(BIN)/mkdocs build --strict

# Fashion-MNIST (workload W2) comes from the Debian package; without it W2 is skipped with a note.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    echo "note: dataset-fashion-mnist could not be installed; W2 is skipped"; \
	  else echo "note: install Fashion-MNIST with: sudo apt-get install dataset-fashion-mnist"; fi; }

# Benchmarks (benchmarks/run.py). bench-quick: seconds, the smoke subset CI runs (checks the output is well
# formed, never timings). bench: the full suite (minutes), rewrites the README's benchmark section.
bench-quick: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run quick

bench: $(VENV)/.bench fashion-mnist
	$(BIN)/python -m benchmarks.run all --readme

# kfac-jax 0.0.8 needs jax 0.9.1 (its graph matcher crashes on 0.10): its own venv, run as a subprocess.
KFAC_VENV := .venv-kfac
$(KFAC_VENV)/.ready:
	$(PYTHON) -m venv $(KFAC_VENV)
	$(KFAC_VENV)/bin/pip install -q "jax==0.9.1" "jaxlib==0.9.1" "kfac-jax==0.0.8" scikit-learn
	touch $@

bench-peers: $(KFAC_VENV)/.ready $(VENV)/.bench
	$(BIN)/python -m benchmarks.run kfac

# Per-device FLOPs, bytes, factorizations and state of each phase program on 1 / 2 / 4 / 8 devices.
bench-scale: $(VENV)/.bench
	$(SPMD_ENV) $(BIN)/python -m benchmarks.scale

bench-planner: $(VENV)/.core
	$(BIN)/python -m benchmarks.planner_speed

clean:
	rm -rf $(VENV) $(NEWEST_VENV) $(KFAC_VENV) .pytest_cache build plan.svg plan.png
