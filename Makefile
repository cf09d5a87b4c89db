# Two commands on a fresh machine: `make run` (set up and serve on the embedded defaults) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench lock

# The virtualenv installs the locks and nothing else: requirements.txt (production) for run, and requirements-dev.txt
# (the same production versions, and the test, benchmark and lock tools) on top of it for test, bench and lock. Each
# stamp is older than its lock once `make lock` rewrites it. pip checks every file against the lock's hashes and, since
# every dependency is pinned there, refuses anything the lock lacks rather than resolving it anew.
$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.txt
	touch $@

$(BIN)/.installed-dev: requirements-dev.txt $(BIN)/.installed
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.txt
	touch $@

# Development mode: DEBUG on (which allows the built-in secret key), SQLite, the offline demo model.
run: export DJANGO_DEBUG ?= on
run: $(BIN)/.installed
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py create_api_key dev --if-none
	$(BIN)/python manage.py create_demo_login
	@echo "Serving on http://$(HOST):$(PORT)/  (chat: http://$(HOST):$(PORT)/chat/, API docs: http://$(HOST):$(PORT)/api/docs/)"
	$(BIN)/python -m bankagent.serve --host $(HOST) --port $(PORT) --workers 1

# Tests run with DEBUG off, as in production, so they need a secret of their own.
test: export DJANGO_SECRET_KEY ?= test-only-secret-key
test: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The service as production runs it, on the machine's PostgreSQL and Redis; results go to bench/results.jsonl.
bench: $(BIN)/.installed-dev
	$(BIN)/python bench/load.py $(BENCH_ARGS)

# Rewrites both locks from requirements.in and requirements-dev.in: the whole tree pinned, for Python 3.11 and later
# on every platform, each version with the hashes of all its files on the Python Package Index, uv's default index (no
# configuration file, nor an index or constraint variable of this machine, takes part). A lock keeps its other pins
# unless its input asks otherwise; LOCK_ARGS=--upgrade moves them all to their newest releases,
# LOCK_ARGS="--upgrade-package NAME" one of them.
LOCK := env -u UV_INDEX -u UV_INDEX_URL -u UV_DEFAULT_INDEX -u UV_EXTRA_INDEX_URL -u UV_FIND_LINKS -u UV_CONSTRAINT \
	-u UV_OVERRIDE $(BIN)/uv pip compile --quiet --no-config --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" $(LOCK_ARGS)
lock: $(BIN)/.installed-dev
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-dev.in -o requirements-dev.txt
