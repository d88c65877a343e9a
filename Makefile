# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make run    virtualenv, install, dev certificates, demo backend + proxy on configs/example.yaml
#   make test   test dependencies, then lint, type check and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/example.yaml
SOURCES := pyproject.toml setup.py $(shell find alb_proxy -name '*.py')
# Requirements listed in pyproject.toml, one per line: $(call requirements,["dependencies"])
requirements = $(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]$(1), sep="\n")'

.PHONY: run test bench certs clean

$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else echo "make: $(PYTHON) has no venv support: install python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The package is installed, not linked: its hot modules are compiled with mypyc (setup.py), so
# any change to the sources reinstalls it. Without a C compiler and Python's headers (and no
# apt-get to fetch them) it is installed uncompiled; ALB_PROXY_PURE=1 asks for that.
$(BIN)/alb-proxy: $(BIN)/python $(SOURCES)
	$(call requirements,["dependencies"]) > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt  # first: mypyc type-checks against them
	@pure=$${ALB_PROXY_PURE:-0}; \
	if [ "$$pure" = 0 ] && ! { command -v cc >/dev/null && $(BIN)/python -c \
	    'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))'; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq gcc python3-dev >/dev/null; \
	  else echo "make: no C compiler or Python headers: installing alb-proxy uncompiled (slower)" >&2; pure=1; fi; \
	fi; \
	echo "$(BIN)/pip install ."; ALB_PROXY_PURE=$$pure $(BIN)/pip install -q .
	@touch $@

$(VENV)/.test-deps: $(BIN)/python pyproject.toml
	$(call requirements,["optional-dependencies"]["test"]) > $(VENV)/test-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/test-requirements.txt
	@touch $@

certs/ca.pem: | $(BIN)/alb-proxy
	$(BIN)/alb-proxy certs dev --out certs

certs: certs/ca.pem

run: $(BIN)/alb-proxy certs/ca.pem
	@$(BIN)/alb-proxy run --config $(CONFIG) --check
	@$(BIN)/alb-proxy demo-backend --port 8081 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT; \
	echo; \
	echo "Try:  curl --cacert certs/ca.pem --resolve site.example.test:8443:127.0.0.1 https://site.example.test:8443/"; \
	echo "      openssl s_client -connect 127.0.0.1:8443 -servername api.example.test -CAfile certs/ca.pem </dev/null"; \
	echo "      curl --cacert certs/ca.pem --cert certs/client.pem --key certs/client.key --resolve site.example.test:8444:127.0.0.1 https://site.example.test:8444/"; \
	echo "      curl http://127.0.0.1:8080/"; \
	echo; \
	$(BIN)/alb-proxy run --config $(CONFIG) & proxy=$$!; \
	trap 'kill -TERM $$proxy 2>/dev/null' INT TERM; \
	while kill -0 $$proxy 2>/dev/null; do wait $$proxy; status=$$?; done; \
	exit $$status

test: $(BIN)/alb-proxy $(VENV)/.test-deps
	$(BIN)/ruff check alb_proxy tests
	$(BIN)/mypy alb_proxy
	$(BIN)/pytest -q

bench: $(BIN)/alb-proxy
	@command -v nginx >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null \
	  && command -v h2load >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy wrk nghttp2-client; }
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) certs state .pytest_cache .mypy_cache .ruff_cache
