# Two commands on a fresh machine with Python >= 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench proto docs clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,test,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meshctl demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/usersvc.py
	$(BIN)/python bench/usersvc_flood.py
	$(BIN)/python bench/sds_v1.py
	$(BIN)/python bench/kubernetes_load.py
	$(BIN)/python bench/gateway_status.py
	$(BIN)/python bench/xds_convergence.py
	$(BIN)/python bench/xds_fleet.py
	$(BIN)/python bench/edge.py
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/proxyless_grpc.py

# The usersvc gRPC code beside usersvc/proto/users.proto is checked in; after changing the
# .proto, regenerate it (grpcio-tools and mypy-protobuf come with the dev extra).
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I . \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
		usersvc/proto/users.proto

# The flag and environment tables in docs/ are generated from --help; tests/test_docs.py fails
# when they are stale.
docs: $(STAMP)
	$(BIN)/python -m envoymesh.docs

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache run
