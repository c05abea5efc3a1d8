# Front door: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch that pip finds on local disk here; override e.g. TORCH_SPEC="torch==2.13.0+cu128".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.dagman-installed

.PHONY: demo test soak venv clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dagman demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# >= 30 minutes of pretraining under random kills and resumes (DAGMAN_SOAK_MINUTES=N for another length)
soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m soak tests/test_soak.py

bench: $(STAMP)
	$(BIN)/python benchmarks/backbone_speed.py
	$(BIN)/python benchmarks/loader_speed.py
	$(BIN)/python benchmarks/step_speed.py --part ratio

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
