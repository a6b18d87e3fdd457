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

.PHONY: setup setup-lowest data browser test test-lowest lint demo demo-train clean

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

# Two pytest-xdist workers of one OpenMP thread each: on 2 cores the suite takes ~10 minutes this way
# against ~16 in one process, which keeps only ~1.1 cores busy (docs/testing.md, "Time"). TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The lowest versions pyproject.toml allows (constraints-lowest.txt: torch 2.13.0, torchvision 0.28.0, numpy
# 1.26.0, ...) in a second virtual env, and the tests of the fused kernel, the models and timm parity against
# them, and the pretrained-weights tests against the oldest huggingface_hub allowed: the kernel must build
# and run under the oldest torch allowed (docs/testing.md, "Lowest versions").
# The kernel is built into its own cache inside that env. 3.5-5 minutes on 2 shared cores. PYTEST_ARGS:
# more pytest options (e.g. --durations=30).
LOWEST_VENV ?= .venv-lowest
LOWEST_BIN  := $(LOWEST_VENV)/bin
LOWEST_TESTS := tests/test_kernel_op.py tests/test_fused.py tests/test_models.py tests/test_timm_parity.py \
	tests/test_triton_op.py tests/test_pretrained.py
# Left out there for time only (every one runs in `make test`):
# - the full-size models (patch16: 224-256 px, 10-45 s a test here); the 28-px minis run the same blocks,
#   fused op, heads and features code;
# - inductor codegen (test_compile_fullgraph, ~80 s a model); torch.compile and AOTAutograd under this torch
#   stay tested by test_fused.py's compile tests, with recording backends;
# - the tests that start a fresh Python per environment setting (TNTVISION_FUSED, TNTVISION_KERNEL_*, a
#   kernel that cannot build, `tnt kernels build`, compile or export as a fresh process's first use): how
#   settings are read is not torch's business; torch.compile and torch.export of a model stay;
# - repeats of one comparison: the whole model with each hook or adapter on block 0 (block 0 with each of
#   them against the modules it calls stays: test_the_inner_transformer_computes_what_its_modules_compute),
#   every model option against the reference path, two of the three timm dropout streams (both rates at
#   once stays), intermediates without the final norm (with it stays), 224-px weights loaded at 96 px
#   (resampling against timm's own function stays), the SE variant's parameter count.
LOWEST_K := not patch16
LOWEST_DESELECT := \
	--deselect tests/test_models.py::test_compile_fullgraph \
	--deselect tests/test_kernel_op.py::test_the_best_copy_runs_by_default_and_the_environment_overrides_it \
	--deselect tests/test_kernel_op.py::test_a_bad_setting_fails_every_call_the_same_way \
	--deselect tests/test_kernel_op.py::test_tnt_kernels_build_and_info \
	--deselect tests/test_fused.py::test_disabled_by_environment \
	--deselect tests/test_fused.py::test_reference_path_when_the_kernel_cannot_be_built \
	--deselect tests/test_fused.py::test_compiled_or_exported_before_any_eager_call_runs_the_fused_op \
	--deselect tests/test_fused.py::test_the_fused_path_never_bypasses_what_is_on_the_inner_modules \
	--deselect tests/test_fused.py::test_every_option_that_reaches_the_op_matches_the_reference \
	--deselect "tests/test_timm_parity.py::test_dropout_and_drop_path_match_timm_with_the_same_stream[drop_path]" \
	--deselect "tests/test_timm_parity.py::test_dropout_and_drop_path_match_timm_with_the_same_stream[dropout]" \
	--deselect "tests/test_timm_parity.py::test_forward_intermediates_match_timm[False]" \
	--deselect tests/test_timm_parity.py::test_position_table_resampling_matches_timm \
	--deselect tests/test_models.py::test_se_variant_params

setup-lowest: $(LOWEST_VENV)/.installed

# torch===2.13.0 in the constraints: the build from PyPI, whose torchvision 0.28.0 ops load (the local
# 2.13.0+cpu wheel cannot load PyPI's torchvision, built against CUDA torch). --no-compile: Python compiles
# the few modules a test imports, not the thousands torch ships.
$(LOWEST_VENV)/.installed: pyproject.toml constraints-lowest.txt
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_BIN)/pip install --quiet --upgrade pip
	$(LOWEST_BIN)/pip install --quiet --no-compile -c constraints-lowest.txt -e . pytest pytest-randomly \
	  pytest-xdist timm
	touch $@

# First the versions and the kernel this job runs (built here, ~1 minute), then the tests.
test-lowest: setup-lowest
	TNTVISION_CACHE=$(abspath $(LOWEST_VENV))/kernels $(LOWEST_BIN)/python -c "import torch, torchvision; \
	  from tntvision import kernels; print('torch', torch.__version__, 'torchvision', \
	  torchvision.__version__, 'fused kernel:', kernels.kernel_dispatch())"
	TNTVISION_CACHE=$(abspath $(LOWEST_VENV))/kernels TNTVISION_REQUIRE_KERNEL=1 OMP_NUM_THREADS=1 \
	  $(LOWEST_BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=5 $(LOWEST_TESTS) $(PYTEST_ARGS) \
	  -k "$(LOWEST_K)" $(LOWEST_DESELECT)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .ruff_cache
