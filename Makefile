# The two set-up commands: `make run` (the demo, end to end) and `make test`. Both work on a fresh
# machine: they create .venv and install what they need, system packages included.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES := chromium redis-server
# The bench's contenders and clients: nginx and Caddy (Debian's own builds), wrk, curl; perf
# (linux-perf) samples the sidecar for BENCHMARKS.md's profile.
BENCH_APT_PACKAGES := nginx wrk caddy curl linux-perf
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install system-deps bench-deps run test soak lint typecheck unit bench clean lock

# Every Python package at the version in constraints.txt: a fresh machine builds what was tested.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo,otel]'
	touch $(STAMP)

# The request path compiled with mypyc (proxy/compiled.py lists it), in place beside the sources:
# about a quarter less CPU a request. Rebuilt when any source changes; importing `proxy` refuses
# a compiled module older than its source. Needs a C compiler and Python's headers.
COMPILED := $(VENV)/.compiled-stamp
$(COMPILED): $(STAMP) setup.py $(wildcard proxy/*.py proxy/*/*.py)
	@command -v cc >/dev/null || { \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq gcc libc6-dev >/dev/null; }
	@$(PY) -c "import os, sysconfig; os.stat(sysconfig.get_paths()['include'] + '/Python.h')" 2>/dev/null || { \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq python3-dev >/dev/null; }
	@echo "compiling the request path with mypyc (a minute or two)"
	AUTHPROXY_MYPYC=1 $(PY) setup.py --quiet build_ext --inplace >/dev/null
	@# setuptools keeps the time of an unchanged module's shim; the build is now, for the check.
	find proxy -name '*.so' -exec touch {} +
	touch $(COMPILED)

install: $(STAMP) $(COMPILED)

# Debian packages the tests drive for real (Chromium for the browser tests, redis-server for the
# shared-state tests: started by the fixture on a free port, never as the system service).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq $$missing >/dev/null; \
	fi

# What `make bench` needs beyond `make install`: the packages above, and the `bench` extra
# (fastapi-proxy-lib, granian) in the venv.
bench-deps: $(BENCH_STAMP)
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq $$missing >/dev/null; \
	fi

# `make run WEB_PORT=5174` (and SIDECAR_PORT, ADMIN_PORT, UPSTREAM_PORT, TOKEN_TTL: the demo's
# access token lifetime in seconds) moves a port without editing config.toml.
STACK_ARGS = $(if $(WEB_PORT),--web-port $(WEB_PORT)) $(if $(SIDECAR_PORT),--sidecar-port $(SIDECAR_PORT)) \
	$(if $(ADMIN_PORT),--admin-port $(ADMIN_PORT)) $(if $(UPSTREAM_PORT),--upstream-port $(UPSTREAM_PORT)) \
	$(if $(TOKEN_TTL),--token-ttl $(TOKEN_TTL))

# Run from $(shell) on purpose: on a SIGINT sent to make alone (an IDE's stop button, a supervisor)
# make waits for a recipe's process forever, but dies at once while a $(shell) runs; the stack sees
# its parent go and stops everything. Its output goes to stderr, so $(shell) returns nothing.
# (`make -n run` expands recipes: it must not start the demo.)
DRY_RUN = $(findstring n,$(firstword -$(MAKEFLAGS)))
run: install
	@: $(if $(DRY_RUN),,$(shell exec $(PY) -m upstream_demo.stack --config config.toml $(STACK_ARGS) 1>&2))
	@exit $(if $(DRY_RUN),0,$(.SHELLSTATUS))

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy upstream_demo tests bench
	$(VENV)/bin/ruff format --check proxy upstream_demo tests bench
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: system-deps install lint typecheck
	$(VENV)/bin/pytest

# The long soak (tests/soak: 500 WebSockets and mixed REST through one sidecar, three minutes;
# SOAK_WEBSOCKETS / SOAK_SECONDS change it). `make test` runs only the short one.
soak: install
	$(VENV)/bin/pytest -m soak tests/soak

$(BENCH_STAMP): pyproject.toml constraints.txt $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo,otel,bench]'
	touch $(BENCH_STAMP)

# BENCH_ARGS=--quick: one short round of every figure (a smoke test of the harness).
bench: install bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
	find proxy -name '*.so' -delete

# Refresh constraints.txt: the newest versions pyproject.toml allows, resolved in a scratch venv.
# Run the whole suite on the result before committing it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[test,demo,otel,bench]'
	{ echo "# Written by 'make lock' from pyproject.toml; 'make' installs with it (pip -c)."; \
	  .lock-venv/bin/pip freeze --exclude authproxy; } > constraints.txt
	rm -rf .lock-venv
