# Two commands on a fresh machine: `make run` (set up and serve on the embedded defaults) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
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
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The service as production runs it, on the machine's PostgreSQL and Redis; results go to bench/results.jsonl.
bench: $(BIN)/.installed
	$(BIN)/python bench/load.py $(BENCH_ARGS)
