# Two entry points: `make demo` (the main job on the built-in trained shapes model) and `make test`.
# Both create .venv when it is missing. Where no torch is installed, torch==2.13.0 is installed first: an
# unpinned torch would pull a multi-GB CUDA build. On a CUDA machine, install your own torch first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDTRT := $(VENV)/bin/sdtrt
EXTRAS ?= export,ort,dev
DEMO_DIR ?= out/demo

.PHONY: install demo test lint typecheck clean train-shapes

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

demo: install
	$(SDTRT) export shapes --out $(DEMO_DIR)/artifacts --precision fp16
	$(SDTRT) check $(DEMO_DIR)/artifacts
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a red circle on a blue background" --steps 20 --cfg 2 --seed 1 \
		--out $(DEMO_DIR)/red-circle.png
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a small yellow circle on a purple background" --steps 20 --cfg 2 \
		--seed 2 --out $(DEMO_DIR)/yellow-circle.png
	@echo "artifacts: $(DEMO_DIR)/artifacts (ONNX files, tokenizer.json, scheduler_config.json, manifest.json)"
	@echo "images:    $(DEMO_DIR)/red-circle.png should show a red circle on a blue background;"
	@echo "           $(DEMO_DIR)/yellow-circle.png a small yellow circle on a purple background"
	@echo "           (a combination the model never saw in training)"

# Retrain the shapes model from scratch (about 45 minutes on 2 CPU cores); writes runtime/models/data/shapes.*
train-shapes: install
	$(PY) -m sdtrt.shapes.train --out runtime/models/data

test: install typecheck
	$(PY) -m pytest -q

typecheck: install
	PY=$(PY) bash tests/typecheck.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
