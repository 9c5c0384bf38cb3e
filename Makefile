# make test: set up .venv if needed and run the whole suite.
# make demo: set up .venv, obtain Fashion-MNIST, run the main job (SFW vs SGD, LeNet-300-100).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: test test-heavy demo lint bench install data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# the few tests that take minutes of CPU (VGG-16 / ResNet-18 reconstruction)
test-heavy: $(STAMP)
	$(PY) -m pytest -m heavy

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# Debian ships Fashion-MNIST as a package; where we may install it we do, otherwise the
# library falls back to torchvision's download into its cache folder.
data:
	@if [ -d "$(FMNIST)" ] || [ -n "$$SFWPRUNE_DATA" ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = "0" ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| echo "apt-get could not install dataset-fashion-mnist; will try torchvision's download"; \
	else \
		echo "Fashion-MNIST not installed; will try torchvision's download"; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/sfwprune demo

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
