# gcm-tal: `make demo` runs the main job, `make test` the whole suite, `make bench` the benchmarks.
# Each target creates .venv and installs the project into it when needed.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.gcm-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gcm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# speed and memory benchmarks (each prints a ratio against a baseline of the same run);
# the quality benchmark takes about an hour: $(BIN)/python benchmarks/quality.py
bench: $(STAMP)
	$(BIN)/python benchmarks/graph_memory.py
	$(BIN)/python benchmarks/pooling_speed.py
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/preprocess_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
