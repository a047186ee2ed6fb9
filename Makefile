# Entry points: `make demo` (the whole pipeline on the bundled sample), `make test`, and `make ui`
# (the Airflow UI on http://127.0.0.1:8080).
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
BROWSER := /usr/bin/chromium

.PHONY: demo test ui venv clean stack-env

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py ml/fastpath/csrc/tanh_mlp.cpp
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (torch 2.13.0 wheel is cp311)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP) $(BROWSER)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The browser tests drive Debian's Chromium: installed once where apt and root are available.
$(BROWSER):
	@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] || { \
		echo "the browser tests need Debian's Chromium at $(BROWSER): apt-get install -y chromium"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# The README's UI command: every Airflow component on this machine, UI and API on 127.0.0.1 only.
ui: $(STAMP)
	bash -c 'source scripts/env.sh && exec airflow standalone'

# docker/.env for the compose stack, with random secrets; never overwrites an existing one.
stack-env:
	bash scripts/make-env.sh

clean:
	rm -rf .local runs
