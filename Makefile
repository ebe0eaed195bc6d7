# Two entry points: `make demo` (the main job on the built-in trained shapes model) and `make test`.
# Both use one .venv, created when missing: `make demo` installs only what the demo runs (the export and ort
# extras), `make test` adds the test extra to the same venv. Where .venv has no torch, $(TORCH) is installed
# first, pinned to the version sdtrt is tested with. On Linux, PyPI's torch wheel is the CUDA build (several GB
# with its nvidia-* libraries); on a CPU-only machine take the CPU build (~0.7 GB) from PyTorch's own index:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# On a CUDA machine, install the torch for your CUDA into .venv first; it is kept.
#
# Each pip step prints one line saying what it installs; pip's own output goes to $(PIP_LOG), shown only when pip
# fails. Installs are recorded in stamp files in .venv, so a second run skips them until pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDTRT := $(VENV)/bin/sdtrt
TORCH ?= torch==2.13.0
DEMO_EXTRAS ?= export,ort,control
TEST_EXTRAS ?= export,ort,test
DEMO_DIR ?= out/demo
PYTEST_ARGS ?=
PIP_LOG := $(VENV)/pip.log

# $(call pip_install,WHAT,ARGS), a shell command: one line saying what, then a quiet `pip install ARGS`.
# --no-compile: Python compiles what it imports on first use; byte-compiling every installed module up front
# adds ~290 MB to the demo venv (1.09 -> 1.38 GB) and about a minute on 2 cores, for modules the demo never imports.
pip_install = { echo "installing $(1)..."; $(PY) -m pip install -q --no-compile $(2) >>$(PIP_LOG) 2>&1 || \
	{ tail -n 40 $(PIP_LOG); echo "pip failed installing $(1); its whole output is in $(PIP_LOG)"; exit 1; }; }

.PHONY: install install-test demo test lint typecheck clean train-shapes train-shapes-control

$(PY):
	@echo "creating $(VENV) with $(PYTHON)..."
	@$(PYTHON) -m venv $(VENV)
	@$(call pip_install,the latest pip,--upgrade pip)

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(call pip_install,$(TORCH),$(TORCH))
	@touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	@$(call pip_install,sdtrt with the $(DEMO_EXTRAS) extras (editable),-e ".[$(DEMO_EXTRAS)]")
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	@$(call pip_install,sdtrt with the $(TEST_EXTRAS) extras (editable),-e ".[$(TEST_EXTRAS)]")
	@touch $@ $(VENV)/.installed-demo

install: $(VENV)/.installed-demo

install-test: $(VENV)/.installed-test

demo: install
	$(SDTRT) export shapes --out $(DEMO_DIR)/artifacts --precision fp16 --controlnet shapes-outline
	$(SDTRT) check $(DEMO_DIR)/artifacts --json $(DEMO_DIR)/check.json --report-json $(DEMO_DIR)/adherence.json
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a red circle on a blue background" --steps 20 --cfg 2 --seed 1 \
		--out $(DEMO_DIR)/red-circle.png
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a small yellow circle on a purple background" --steps 20 --cfg 2 \
		--seed 2 --out $(DEMO_DIR)/yellow-circle.png
	$(PY) -m sdtrt.shapes.hint --shape triangle --centre 40,84 --radius 24 --out $(DEMO_DIR)/outline-hint.png
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a red circle on a blue background" --control outline:$(DEMO_DIR)/outline-hint.png \
		--steps 20 --cfg 2 --seed 1 --out $(DEMO_DIR)/red-outline.png
	@echo "artifacts: $(DEMO_DIR)/artifacts (ONNX files, tokenizer.json, scheduler_config.json, manifest.json)"
	@echo "check:     $(DEMO_DIR)/check.json (each component against PyTorch), $(DEMO_DIR)/adherence.json"
	@echo "           (held-out prompts scored on what the images show)"
	@echo "images:    $(DEMO_DIR)/red-circle.png should show a red circle on a blue background;"
	@echo "           $(DEMO_DIR)/yellow-circle.png a small yellow circle on a purple background"
	@echo "           (a combination the model never saw in training)"
	@echo "control:   $(DEMO_DIR)/red-outline.png: the same prompt with the outline ControlNet and the hint"
	@echo "           $(DEMO_DIR)/outline-hint.png (a triangle's outline, lower left): a red triangle there"

# Retrain the shapes model from scratch (about 45 minutes on 2 CPU cores); writes runtime/models/data/shapes.*
train-shapes: install
	$(PY) -m sdtrt.shapes.train --out runtime/models/data

# Retrain the shapes outline ControlNet over the shipped shapes model (about 8 minutes on 2 CPU cores); writes
# runtime/models/data/shapes-outline/ and shapes-outline.json
train-shapes-control: install
	$(PY) -m sdtrt.shapes.train_control --out runtime/models/data

test: install-test typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

typecheck: install-test
	PY=$(PY) bash tests/typecheck.sh

lint: install-test
	@$(PY) -c "import ruff" 2>/dev/null || $(call pip_install,ruff,"ruff>=0.5")
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
