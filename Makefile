# One-command set-up: every target installs what it needs into .venv on first
# use (stamp file), and skips the install afterwards.
#   make test   - install (first time) and run the test suite
#   make demo   - install, make the tiny COCO set, train + test CE Mask R-CNN
#   make bench  - CE layer and backbone benchmarks (ratios, not tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PIN := -c requirements/pinned.txt
NPROC := $(shell nproc 2>/dev/null || echo 2)
STAMP := $(VENV)/.ce_mmdet-installed
DEMO_DATA := data/tiny_coco
DEMO_CONFIG := configs/demo/mask-rcnn_r50-ce_fpn_tiny-coco.py
DEMO_WORK ?= work_dirs/demo
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements/pinned.txt requirements/runtime.txt requirements/tests.txt setup.py
	@# a new venv: torch 2.13 (the pinned stack) needs Python 3.10 or newer
	@test -x $(PY) || { \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	    echo "make needs Python 3.10 or newer; $(PYTHON) is: $$($(PYTHON) --version 2>&1 | head -1). Name another: make test PYTHON=python3.11"; exit 1; }; \
	  $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q $(PIN) 'setuptools>=77,<81' ninja wheel
	@# keep an existing torch; otherwise the pinned one (the CPU build on this machine)
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q $(PIN) torch
	$(PIP) install -q $(PIN) mmengine
	@# mmcv with compiled ops: built from source against the venv's torch the first
	@# time (20-30 min on 2 cores); pip's wheel cache makes later installs take seconds.
	@$(PY) -c 'import mmcv.ops' 2>/dev/null || { \
	  echo 'building mmcv 2.1.0 with ops from source (first time: 20-30 min on 2 cores)'; \
	  MAX_JOBS=$(NPROC) $(PIP) install -q --no-build-isolation $(PIN) mmcv; }
	$(PIP) install -q $(PIN) mmdet pycocotools -r requirements/tests.txt
	@# triton: the Triton kernels' tests run in its interpreter on CPU. Keep the
	@# one a CUDA torch brought (torch pins it); otherwise the pinned one. Its
	@# wheels are Linux-only (x86-64, aarch64): elsewhere (macOS) those tests skip.
	@$(PY) -c 'import triton' 2>/dev/null || \
	  if [ "$$(uname -s)" = Linux ]; then $(PIP) install -q $(PIN) triton; \
	  else echo "no triton wheels for $$(uname -s): the Triton kernels' tests will be skipped"; fi
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(PY) -c 'import ce_mmdet, mmcv.ops, mmdet; print("ce_mmdet", ce_mmdet.__version__, "| mmdet", mmdet.__version__, "| mmcv", mmcv.__version__)'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	@test -f $(DEMO_DATA)/annotations/instances_val2017.json || $(PY) tools/misc/make_tiny_coco.py $(DEMO_DATA)
	$(PY) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK)
	$(PY) tools/test.py $(DEMO_CONFIG) $$(cat $(DEMO_WORK)/last_checkpoint) --work-dir $(DEMO_WORK)

bench: $(STAMP)
	$(PY) tools/analysis_tools/benchmark_ce_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
