# policylink's own commands. Each installs what it needs into .venv first.
#   make demo   local server + client with a built-in policy (no checkpoint, no GPU)
#   make test   the test suite (installs torch + lerobot + the peers' clients)

PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test bench proto clean-venv

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
	$(PIP) install $(PIP_FLAGS) -e ".[server,grpc,test,monitor,sim,vla,robot,jpeg,ray,config]"
	$(PIP) install $(PIP_FLAGS) --no-deps "openpi-client==0.1.2"
	$(PIP) install $(PIP_FLAGS) "dm-tree>=0.1.8" "pillow>=9"
	# The monitor page is tested in Debian's Chromium (no browser download); CI runs as root.
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: install chromium and chromium-driver (apt) to run the monitor's browser test"; fi; \
	fi
	# MuJoCo (ALOHA, SO-100) renders headless through Mesa's software EGL: no GPU, no display.
	@if ! /sbin/ldconfig -p | grep -q 'libEGL_mesa.so.0'; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri >/dev/null; \
	  else echo "note: install libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri (apt) for the MuJoCo simulators"; fi; \
	fi
	touch $@ $(VENV)/.client

# Regenerate the gRPC code in src/policylink/proto/ from proto/ (grpcio-tools matches the grpcio pin).
proto: $(VENV)/.dev
	$(PIP) install $(PIP_FLAGS) "grpcio-tools==1.73.1"
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src proto/policylink/proto/v1/policylink.proto

clean-venv:
	rm -rf $(VENV)
