# Two entry points: `make demo` (the whole pipeline on the bundled sample) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean stack-env

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py ml/fastpath/csrc/tanh_mlp.cpp
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (torch 2.13.0 wheel is cp311)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# docker/.env for the compose stack, with random secrets; never overwrites an existing one.
stack-env:
	bash scripts/make-env.sh

clean:
	rm -rf .local runs
