# Two entry points: `make demo` (synthetic videos -> shards -> train -> evaluate) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on our machines these two come from local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

DEMO_DIR := demo
DEMO_RUN := $(DEMO_DIR)/runs/$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(PY) tools/make_synthetic.py $(DEMO_DIR)/videos
	$(PY) tools/make_shards.py $(DEMO_DIR)/videos/train.txt --root $(DEMO_DIR)/videos --out $(DEMO_DIR)/shards --split train --short-side 0 --labels $(DEMO_DIR)/videos/labels.csv
	$(PY) tools/make_shards.py $(DEMO_DIR)/videos/val.txt --root $(DEMO_DIR)/videos --out $(DEMO_DIR)/shards --split val --short-side 0 --labels $(DEMO_DIR)/videos/labels.csv
	$(PY) launch.py --cfg configs/demo.yaml output_dir=$(DEMO_RUN)
	$(PY) launch.py --cfg configs/demo.yaml output_dir=$(DEMO_RUN) --test --weights $(DEMO_RUN)/best.pt --test-crops 3 --test-clips 2
	$(PY) tools/predict.py $(DEMO_DIR)/videos/videos/val/000000.mp4 $(DEMO_DIR)/videos/videos/val/000001.mp4 --cfg configs/demo.yaml --weights $(DEMO_RUN)/best.pt --short-side 0 --top 2
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/runs"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
