# policylink's own commands. Each installs what it needs into .venv first.
#   make demo   local server + client with a built-in policy (no checkpoint, no GPU)
#   make test   the test suite (installs torch + lerobot + the peers' clients)

PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test bench clean-venv

demo: $(VENV)/.client
	$(VENV)/bin/policylink demo

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(VENV)/bin/python benchmarks/run_all.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	# pip 23's resolver backtracks for many minutes on lerobot's pins; newer pip resolves in seconds.
	$(PIP) install $(PIP_FLAGS) --upgrade "pip>=25"

# The robot-side client alone: numpy + msgpack + websockets.
$(VENV)/.client: pyproject.toml $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) -e .
	touch $@

# Everything the tests need: the server extra (lerobot + torch) and test tools.
# openpi-client pins numpy<2 while lerobot's stack needs numpy 2; its code runs
# unchanged on numpy 2, so it is installed without its pins (its two other needs by hand).
$(VENV)/.dev: pyproject.toml $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) -e ".[server,test]"
	$(PIP) install $(PIP_FLAGS) --no-deps "openpi-client==0.1.2"
	$(PIP) install $(PIP_FLAGS) "dm-tree>=0.1.8" "pillow>=9"
	touch $@ $(VENV)/.client

clean-venv:
	rm -rf $(VENV)
