# Bloomwire developer tasks. `make test` and `make demo` work on a fresh clone: they set up
# the virtualenv and Mosquitto first. Run `make` for the list of targets.

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.bloomwire-installed
PYTEST_ARGS ?=
LINT_PATHS = src tests

.DEFAULT_GOAL := help
.PHONY: help setup python-check mosquitto node chromium test lint fmt demo up bench bench-web clean compose-secrets

help: ## list the targets
	@echo "Bloomwire make targets:"
	@grep -E '^[a-zA-Z_/.-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-30s %s\n", $$1, $$2}'
	@echo "Variables: PY=$(PY) (interpreter for the venv), PYTEST_ARGS='$(PYTEST_ARGS)'"

WEB_STAMP = web/node_modules/.bloomwire-installed

setup: python-check $(STAMP) mosquitto $(WEB_STAMP) chromium ## .venv with Bloomwire (editable, dev extras), Mosquitto, the web pages' npm packages, Chromium

python-check:
	@command -v $(PY) >/dev/null 2>&1 || { \
		echo "error: '$(PY)' not found. Install Python 3.11+ or run: make PY=/path/to/python3.11 ..."; \
		exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: Bloomwire needs Python >= 3.11, but $(PY) is $$($(PY) -V 2>&1)."; \
		echo "       Install 3.11+ and run: make PY=python3.11 setup"; \
		exit 1; }

$(BIN)/python:
	@echo "creating virtualenv $(VENV) with $$($(PY) -V)"
	@$(PY) -m venv $(VENV) || { \
		echo "error: '$(PY) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv"; \
		rm -rf $(VENV); exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

# Debian starts its own mosquitto on port 1883 after installing; Bloomwire never uses 1883
# (each broker it starts picks free ports), so that service may keep running.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		exit 0; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "error: Mosquitto is not installed and apt-get is not available."; \
		echo "       Install Mosquitto 2.0+ with your package manager (e.g. brew install mosquitto)."; \
		exit 1; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients; \
	elif command -v sudo >/dev/null 2>&1; then \
		echo "installing mosquitto with sudo apt-get"; \
		sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients; \
	else \
		echo "error: Mosquitto is not installed and this is not root and has no sudo."; \
		echo "       As root run: apt-get install -y mosquitto mosquitto-clients"; \
		exit 1; \
	fi

# Installs Debian packages like the mosquitto target: as root, else with sudo, else says how.
define apt_install
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "error: $(1) is not installed and apt-get is not available; install $(2) with your package manager."; \
		exit 1; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing $(2) with apt-get"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(2); \
	elif command -v sudo >/dev/null 2>&1; then \
		echo "installing $(2) with sudo apt-get"; \
		sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y $(2); \
	else \
		echo "error: $(1) is not installed and this is not root and has no sudo."; \
		echo "       As root run: apt-get install -y $(2)"; \
		exit 1; \
	fi
endef

node:
	@if command -v npm >/dev/null 2>&1; then exit 0; fi; \
	$(call apt_install,npm,nodejs npm)

# The browser pages' packages (MQTT.js, Leaflet, qrcode-generator), exactly as web/package-lock.json
# pins them; again whenever the lockfile changes.
$(WEB_STAMP): web/package-lock.json | node
	cd web && npm ci --no-audit --no-fund
	@touch $@

# The web tests and `bloomwire bench web` drive Debian's Chromium (Playwright cannot download its
# own browser here); a CJK font so the Chinese text of the customer page renders.
chromium:
	@if [ -x /usr/bin/chromium ] && fc-list 2>/dev/null | grep -qi "wqy\|noto sans cjk"; then exit 0; fi; \
	$(call apt_install,chromium,chromium fonts-wqy-microhei)

test: setup ## run the test suite against a real Mosquitto (PYTEST_ARGS=... to pass options)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup ## ruff check, ruff format --check, mypy --strict
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

fmt: setup ## format the code and apply safe ruff fixes
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

demo: setup ## run the end-to-end demo (local broker, services, simulated riders)
	$(BIN)/bloomwire demo

up: setup ## run broker and services locally until Ctrl-C
	$(BIN)/bloomwire up

bench: setup ## ingest benchmark
	$(BIN)/bloomwire bench ingest

bench-web: setup ## web benchmark: dashboard with 500 orders and 200 riders, N customer pages
	$(BIN)/bloomwire bench web

broker/mosquitto.docker.conf: broker/mosquitto.conf.template src/bloomwire/runtime/broker.py | $(STAMP) ## regenerate the compose broker config
	$(BIN)/python -m bloomwire.runtime.broker docker-config > $@

SHOPS ?= s1,s2,s3
RIDERS ?= r1,r2,r3,r4,r5,r6,r7,r8,r9,r10

compose-secrets: $(STAMP) ## passwords in docker/secrets/ for compose.yaml's accounts (SHOPS=.. RIDERS=..; kept if present)
	$(BIN)/python -m bloomwire.app.compose secrets docker/secrets --shops $(SHOPS) --riders $(RIDERS)

clean: ## remove runtime data (var/) and tool caches; keeps .venv
	rm -rf var/ .pytest_cache/ .mypy_cache/ .ruff_cache/
