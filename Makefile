# `make run` serves on port 5013 (HOST/PORT override); `make test` runs the suite. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# torch is installed first and pinned: left to a resolver, it pulls a multi-GB build.
TORCH := torch==2.13.0
# PyPI's Linux torch wheel is the CUDA build; on a CPU-only machine, TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU wheel instead (a fresh .venv: `make clean` first).
TORCH_INDEX ?=

.PHONY: run test bench bench-full soak lint docs system-deps clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

# MALLOC_ARENA_MAX: glibc reads it at start; 2 arenas instead of one per busy thread (~170 MB less RSS here).
run: $(VENV)/.installed
	MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} $(VENV)/bin/gunicorn --config gunicorn.conf.py

# Redis (async tests), Chromium (web page tests), nginx (the proxy tests), prometheus (promtool lints /metrics),
# curl and docker-compose (validates the compose file) come from Debian's packages.
system-deps:
	@missing=""; lean=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || lean="$$lean nginx"; \
	command -v promtool >/dev/null || lean="$$lean prometheus"; \
	if [ -n "$$missing$$lean" ]; then \
		echo "installing Debian packages:$$missing$$lean"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq || exit 1; \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"; \
		[ -z "$$missing" ] || $$APT $$missing >/dev/null || exit 1; \
		[ -z "$$lean" ] || $$APT --no-install-recommends $$lean >/dev/null || exit 1; \
	fi

test: $(VENV)/.test-installed system-deps
	$(PY) -m pytest

# Runs the benchmarks in bench/ on this machine and rewrites their sections of BENCHMARKS.md
# (BENCH_MODEL=svd-xt on a GPU machine).
bench: $(VENV)/.test-installed
	$(PY) bench/run.py overhead.py encoding.py load.py gpu_stages.py hostile.py postprocess.py animatelcm.py \
		families.py memory.py result_store.py

# The full-size SVD-XT architecture with random weights (builds 13 GB outside the repository once; ~40 min on
# 2 CPU cores, 10 GB of RAM): cache_interval through the real service, and a FLOP projection for a GPU.
bench-full: $(VENV)/.test-installed
	$(PY) bench/run.py full_size.py

# The lifecycle state machines and SIGKILL crash runs at length (~20 min), into BENCHMARKS.md.
soak: $(VENV)/.test-installed system-deps
	$(PY) bench/run.py soak.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/hadolint Dockerfile

# The tables in docs/api.md and docs/configuration.md and .env.example are generated from the schemas in
# params.py and config.py.
docs: $(VENV)/.installed
	$(PY) scripts/gen_docs.py

clean:
	rm -rf $(VENV) .pytest_cache
