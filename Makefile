# sr_lab — every target sets up its own virtualenv on first use (torch + torchvision from the registry).
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sr_lab-installed
EXP    ?= ccsr_stage1
ARGS   ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train infer eval testset degradation-sheet pretrain-tiny collect test test-slow bench bench-degradation bench-inference bench-latents bench-params reproduce toy-presets lint clean

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  variables: EXP=<preset in experiments/> ARGS='<hydra overrides>' PYTEST_ARGS='...'"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,metrics]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install sr_lab with its dependencies (editable)

train: $(STAMP) ## train a preset: make train EXP=ccsr_stage1 ARGS="trainer=gpu ..."
	$(BIN)/sr-train experiment=$(EXP) $(ARGS)

infer: $(STAMP) ## super-resolve images: make infer ARGS="checkpoint=<run>/export input=<img|dir> output_dir=<dir>"
	$(BIN)/python -m sr_lab.inference.run $(ARGS)

eval: $(STAMP) ## score SR vs HR (+ inference with N seeds): make eval ARGS="sr_dir=<dir> hr_dir=<dir>" (conf/eval.yaml)
	$(BIN)/python -m sr_lab.eval.run $(ARGS)

testset: $(STAMP) ## synthetic HR/LR test set: make testset ARGS="hr_dirs=<dir> degradation=stablesr|bsrgan out_dir=<dir>"
	$(BIN)/python -m sr_lab.eval.testset $(ARGS)

pretrain-tiny: $(STAMP) ## train the tiny VAE + UNet from scratch on scikit-image's photos (<= 30 min CPU): make pretrain-tiny ARGS="--threads 1 | --minutes-budget 30"
	$(BIN)/python -m sr_lab.pretrain.tiny $(ARGS)

degradation-sheet: $(STAMP) ## render a degradation contact sheet: make degradation-sheet ARGS="degradation=realesrgan_motion"
	$(BIN)/sr-degradation-sheet $(ARGS)

collect: $(STAMP) ## collect an eval sweep into a table + perception-distortion plot: make collect DIR=multirun/eval/<date>
	$(BIN)/python -m sr_lab.eval.collect $(DIR) $(ARGS)

test: $(STAMP) ## run the test suite (CPU, no downloads; slow tests excluded)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP) ## run only the tests marked slow
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP) ## inference + training + degradation benchmarks on this device (CUDA: ~10 min; CPU: ARGS=--quick) -> benchmarks/results/
	PY=$(BIN)/python bash benchmarks/run_all.sh $(ARGS)

reproduce: $(STAMP) ## train the toy stages, run the papers' ablations, table -> benchmarks/results/reproduce/ (CPU < 1 h; ARGS="--quick | --only 1,3 | --fresh | --device cuda")
	$(BIN)/python benchmarks/reproduce.py $(ARGS)

toy-presets: $(STAMP) ## every preset's default toy run, val PSNR-Y vs bicubic -> benchmarks/results/toy_presets/ (CPU ~20 min)
	$(BIN)/python benchmarks/toy_presets.py $(ARGS)

bench-degradation: $(STAMP) ## print degradation pairs/s (batch 16, 512 crops) on this machine's device
	$(BIN)/python benchmarks/degradation.py $(ARGS)

bench-inference: $(STAMP) ## print s/image, peak memory and seed batching speed for 128->512 (tiny or --checkpoint)
	$(BIN)/python benchmarks/inference.py $(ARGS)

bench-latents: $(STAMP) ## print StableSR latent-record generation records/s on this machine's device
	$(BIN)/python benchmarks/latents.py $(ARGS)

bench-params: $(STAMP) ## print an adapter's parameters per branch at SD 2.1-base shape (meta device): make bench-params ARGS="adapter=clearsr"
	$(BIN)/python benchmarks/adapter_params.py $(ARGS)

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
