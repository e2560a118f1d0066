# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench-planner graphviz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(VENV)/.examples: $(VENV)/.core
	$(BIN)/pip install -q -e ".[examples]"
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

demo: $(VENV)/.examples graphviz
	$(BIN)/python -m curvplan.examples.digits

test: $(VENV)/.test graphviz
	$(BIN)/python -m pytest tests curvplan

bench-planner: $(VENV)/.core
	$(BIN)/python -m benchmarks.planner_speed

clean:
	rm -rf $(VENV) .pytest_cache plan.svg plan.png
