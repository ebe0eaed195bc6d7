# Two entry points: `make demo` (the main job on the built-in tiny model) and `make test`.
# Both create .venv when it is missing. Where no torch is installed, torch==2.13.0 is installed first: an
# unpinned torch would pull a multi-GB CUDA build. On a CUDA machine, install your own torch first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDTRT := $(VENV)/bin/sdtrt
EXTRAS ?= export,ort,dev
DEMO_DIR ?= out/demo

.PHONY: install demo test lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

demo: install
	$(SDTRT) export tiny --out $(DEMO_DIR)/artifacts --precision fp16
	$(SDTRT) check $(DEMO_DIR)/artifacts
	$(SDTRT) generate $(DEMO_DIR)/artifacts "a photo of a cat" --negative "blurry" --steps 12 --seed 1 \
		--size 128x128 --out $(DEMO_DIR)/demo.png
	@echo "artifacts: $(DEMO_DIR)/artifacts (ONNX files, tokenizer.json, scheduler_config.json, manifest.json)"
	@echo "image:     $(DEMO_DIR)/demo.png (random weights: expect noise)"

test: install typecheck
	$(PY) -m pytest -q

typecheck: install
	PY=$(PY) bash tests/typecheck.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
