# One entry point for people and CI. Everything installs into .venv from the project's own files.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: system browser install run test test-fast lint typecheck format bench clean starter-bundle

# Debian packages the project needs: Fashion-MNIST (the zoo's clothing images) and Python 3.11.
system:
	@missing=""; \
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing="$$missing dataset-fashion-mnist"; \
	command -v $(PY) >/dev/null 2>&1 || missing="$$missing python3.11 python3.11-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

install: system $(STAMP)

# Debian's Chromium, which the browser tests drive (tests/browser; Playwright never downloads
# a browser of its own).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian packages: chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	}

# The service on this machine: SQLite, a SQLite-backed Celery broker, one worker, the API on
# 127.0.0.1:8000, and the starter zoo, imported from its shipped bundle on first use.
run: install
	$(BIN)/task2vec run

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install -e ./client  # task2vec_client, installable alone too
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy app workers bench client/task2vec_client

# The whole suite: lint, types, every test (real processes, fault drills and the console in a
# real browser included); the slowest tests are listed at the end.
test: browser lint typecheck
	$(BIN)/pytest --durations=10

# Everything but the tests marked slow: the loop to run while changing code.
test-fast: browser lint typecheck
	$(BIN)/pytest -m "not slow" --durations=10

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The shipped starter zoo, rebuilt from the offline data (cached under $(T2V_DATA_DIR), ./data)
# and written as a bundle. TORCH_HOME is emptied so the probe is the one that ships offline
# (EfficientNet-Lite0) on every machine.
STARTER_BUNDLE := app/data/bundles/starter.t2vzoo
starter-bundle: install
	mkdir -p .starter-torch-home
	TORCH_HOME=$(CURDIR)/.starter-torch-home $(BIN)/task2vec zoo build --preset starter
	TORCH_HOME=$(CURDIR)/.starter-torch-home $(BIN)/task2vec zoo export --zoo starter --out $(STARTER_BUNDLE)
	rmdir .starter-torch-home

bench: install
	$(BIN)/python -m bench.embed

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
