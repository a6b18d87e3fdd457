# Set-up and the two jobs of the README. Everything installs into a virtual environment here (.venv),
# with the exact versions of constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_OUT ?= runs/fashion_mnist_$(DEMO_STAMP)
DEMO_MINUTES ?= 14
DEMO_PROCS ?= 2

.PHONY: setup data browser test lint demo demo-train clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# The real Fashion-MNIST (Debian package dataset-fashion-mnist), unless it is already there.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Headless Chromium and its driver (Debian's packages) for the test of tnt serve's page, unless there.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

# The README's first command: train tnt_mini_patch4_28 on the real Fashion-MNIST for DEMO_MINUTES of wall
# time (the schedule anneals to fit), evaluate it on the 10,000 test images (confusion matrix), draw the
# paper's figures for one test image, and predict the example images. Each run gets a fresh folder, so
# earlier demos are kept.
demo: setup data demo-train
	$(BIN)/tnt eval --checkpoint $(DEMO_OUT) --data fashion-mnist --split test
	$(BIN)/tnt visualize --checkpoint $(DEMO_OUT) docs/examples/ankle_boot_0.png --out $(DEMO_OUT)/figures
	$(BIN)/tnt predict --checkpoint $(DEMO_OUT) docs/examples
	@echo "run folder:  $(DEMO_OUT)"
	@echo "  summary:   $(DEMO_OUT)/summary.json   curves: $(DEMO_OUT)/curves.png"
	@echo "  figures:   $(DEMO_OUT)/figures/       confusion matrix: $(DEMO_OUT)/confusion_test.png"
	@echo "  model:     $(DEMO_OUT)/model/         metrics: $(DEMO_OUT)/metrics.jsonl"

# DEMO_PROCS processes of one thread each (torchrun, DDP over gloo): this small model's kernels are too
# small to keep two threads busy, and two processes train ~1.5x faster than one with two threads
# (BENCHMARKS.md). OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads starve each other on a shared machine.
demo-train: setup data
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(DEMO_PROCS) \
	  -m tntvision.cli train --model tnt_mini_patch4_28 --data fashion-mnist \
	  --out $(DEMO_OUT) --time-budget $(DEMO_MINUTES) --epochs 30

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
