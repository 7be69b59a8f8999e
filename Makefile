# The two commands: `make serve` and `make test`. Both set up .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= deployments/local.yaml
# torch is pinned to the CPU build on disk here; on a GPU host install the CUDA build first.
TORCH   ?= torch==2.13.0

.PHONY: install serve stop test lint clean

# cluster-up / cluster-deploy / cluster-down (ray up on real hosts) live in infra/cluster.mk
-include infra/cluster.mk
.DEFAULT_GOAL := install

$(BIN)/tandem:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"

install: $(BIN)/tandem

serve: $(BIN)/tandem
	$(BIN)/tandem model init
	$(BIN)/tandem up --config $(CONFIG) --detach

stop:
	@[ -x $(BIN)/tandem ] && $(BIN)/tandem stop || true

test: $(BIN)/tandem
	$(BIN)/tandem model init
	$(BIN)/ruff check .
	$(BIN)/pytest -x -q tests

lint: $(BIN)/tandem
	$(BIN)/ruff check .

clean: stop
	rm -rf $(VENV) .run
