# The two commands: `make serve` and `make test`. Both set up .venv when it is missing, and
# bring it up to date when pyproject.toml changed since it was installed, or TORCH was given.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= deployments/local.yaml
# torch is pinned to the CPU build on disk here; on a GPU host install the CUDA build first:
# `make install TORCH=torch`. A TORCH given to make (command line or environment) other than
# the one installed reinstalls torch; without one, the installed torch stays.
TORCH   ?= torch==2.13.0
# the TORCH that .venv's torch was installed from, recorded by the install
TORCH_STAMP     := $(VENV)/torch-spec
INSTALLED_TORCH := $(shell cat $(TORCH_STAMP) 2>/dev/null)

.PHONY: install serve stop test lint clean FORCE

# cluster-up / cluster-deploy / cluster-down (ray up on real hosts) live in infra/cluster.mk
-include infra/cluster.mk
.DEFAULT_GOAL := install

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp's date cannot tell that TORCH changed, its content can: out of date (FORCE) when
# a given TORCH differs from it; the default does not count, or a plain `make test` would put
# the CPU build back over a CUDA one. pip keeps an installed torch that meets the new spec
# (`torch` over the CPU build), so the one a recorded spec installed goes first. A venv from
# before the stamp keeps the torch it has unless TORCH is given (it may be a CUDA build).
ifneq ($(origin TORCH),file)
ifneq ($(INSTALLED_TORCH),$(strip $(TORCH)))
$(TORCH_STAMP): FORCE
endif
endif
$(TORCH_STAMP): | $(BIN)/python
	@if [ ! -e $@ ] && [ "$(origin TORCH)" = file ] && $(BIN)/python -c 'import torch' 2>/dev/null; \
	then \
		echo "$(VENV): keeping its torch (make install TORCH=... installs another)"; \
		echo unrecorded > $@; \
	else \
		if [ -s $@ ]; then (set -x; $(BIN)/pip uninstall -y -q torch); fi; \
		(set -x; $(BIN)/pip install -q "$(TORCH)") && printf '%s\n' '$(strip $(TORCH))' > $@; \
	fi

# after torch, so that the package's `torch>=...` finds it installed; touched, since pip may
# leave the script as it was and it would stay older than pyproject.toml
$(BIN)/tandem: pyproject.toml | $(TORCH_STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(BIN)/tandem

serve: $(BIN)/tandem
	$(BIN)/tandem model init
	$(BIN)/python -m cluster.engine.cpu_kernels
	$(BIN)/tandem up --config $(CONFIG) --detach

stop:
	@[ -x $(BIN)/tandem ] && $(BIN)/tandem stop || true

test: $(BIN)/tandem
	$(BIN)/tandem model init
	$(BIN)/python -m cluster.engine.cpu_kernels
	$(BIN)/ruff check .
	$(BIN)/pytest -x -q tests

lint: $(BIN)/tandem
	$(BIN)/ruff check .

# Nothing of a cluster that is still alive after `stop` (stop failed, or found no .venv to run
# it from): .venv runs it and .run holds its pid and auth token. The pid is read as make
# starts, since stop deletes .run/state.json even when it could not end the cluster.
# .run/cluster (cluster.mk's CLUSTER_RUN) holds the token of a `ray up` cluster, which may be
# up on other hosts whatever this machine runs: kept; `make cluster-down` removes it once that
# cluster is down.
LOCAL_PID := $(shell sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' .run/state.json 2>/dev/null)
clean: stop
	@pid="$(LOCAL_PID)"; \
	if [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null; then \
		echo "make clean: the local cluster (pid $$pid, from .run/state.json) is still" \
			"running after stop; nothing deleted. End it, or delete .run/state.json if" \
			"that pid is not the cluster." >&2; \
		exit 1; \
	fi
	rm -rf $(VENV)
	@if [ -d .run ]; then \
		find .run -mindepth 1 -maxdepth 1 ! -name cluster -exec rm -rf {} +; \
		rmdir .run 2>/dev/null || echo "kept .run/cluster: a ray up cluster's token (make cluster-down)"; \
	fi
