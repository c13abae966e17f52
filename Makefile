# The two commands of the README. Each sets up a fresh machine on first use (system packages,
# then a virtualenv in .venv), so nothing has to be installed by hand.
VENV ?= .venv
STAMP := $(VENV)/.gefl-installed

.PHONY: quickstart test lint setup

quickstart: $(STAMP)
	$(VENV)/bin/gefl simulate

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check .

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	./scripts/setup.sh $(VENV)
	touch $@
