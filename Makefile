SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV := .venv
STAMP := $(VENV)/.stamp

.PHONY: venv run test test-deps bench bench-cluster clean

venv: $(STAMP)

# (Re)install when the packaging metadata changes.  editable_mode=compat keeps the
# project root on sys.path, which is what lets twistd find twisted/plugins/mta_plugin.py.
$(STAMP): setup.cfg pyproject.toml
	@set -e; \
	if [ ! -x $(VENV)/bin/pip ]; then \
	  rm -rf $(VENV); \
	  if ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "$(PYTHON) -m venv failed; installing python3-venv" >&2; \
	      export DEBIAN_FRONTEND=noninteractive; \
	      apt-get install -y -q python3-venv || { apt-get update -q && apt-get install -y -q python3-venv; }; \
	      $(PYTHON) -m venv $(VENV); \
	    else \
	      echo "cannot create $(VENV): install python3-venv (Debian) and retry" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	fi
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $@

run: venv
	mkdir -p spool
	@echo 'mta, sendmail and twistd are in $(CURDIR)/$(VENV)/bin; for this shell: export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"'
	$(VENV)/bin/twistd -n mta --config etc/mta.toml

# Debian's postfix (private instances: tests/postfix.py; smtp-sink), swaks,
# dovecot and fetchmail, installed without starting their system services;
# nothing to do when present.
test-deps:
	@bash tests/setup-deps

test: venv test-deps
	$(VENV)/bin/python -m pytest -q -x -p no:cacheprovider tests

# make bench BENCH_ARGS='--cases inbound,e2e -r 3'  (bench/run.py --help lists the cases)
bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# 1, 2 and 3 nodes on one private PostgreSQL against one node on SQLite.
bench-cluster: venv test-deps
	$(VENV)/bin/python bench/cluster.py

clean:
	rm -rf build dist *.egg-info _trial_temp .hypothesis .pytest_cache twistd.pid twistd.log
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name dropin.cache \) -exec rm -rf {} +
