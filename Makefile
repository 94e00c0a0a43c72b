# EchoX Voice. `make demo` runs the main job on the embedded default; `make test` runs every non-gpu test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := espeak-ng sox docker-compose chromium chromium-driver
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint typecheck clean

PROTO_STAMP := services/proto/__init__.py

install: $(STAMP) $(PROTO_STAMP)

# the gRPC and protobuf stubs are generated from protos/, never committed
$(PROTO_STAMP): $(STAMP) $(wildcard protos/echox/v1/*.proto) services/common/protogen.py
	$(PY) -m services.common.protogen

$(STAMP): pyproject.toml scripts/install-apt.sh scripts/install-triton.sh
	bash scripts/install-apt.sh $(APT_PACKAGES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,training,serving]"
	bash scripts/install-triton.sh $(VENV)
	touch $(STAMP)

demo: install
	$(VENV)/bin/echox demo

test: install
	bash scripts/ensure-redis.sh
	$(VENV)/bin/ruff check echox services training tests deploy
	$(VENV)/bin/mypy
	$(PY) -m pytest -m "not gpu" tests

lint:
	$(VENV)/bin/ruff check echox services training tests deploy

typecheck:
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
