# mlscore_jax: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# make train CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp ARGS="--config.x=y"
CONFIG  ?= configs/cpu/digits_ddpmpp.py
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
ARGS    ?=
MAIN    := $(PY) -m mlscore_jax.main
STAMP  := $(VENV)/.installed

.PHONY: install install-torch test lint format clean train train-deq eval demo bench \
	train-digits train-digits-mlp train-mnist train-toy2d \
	train-vp-cifar10 train-vp-cifar10-deep train-subvp-cifar10 train-subvp-cifar10-deep \
	train-vp-imagenet32 train-vp-imagenet32-deep train-subvp-imagenet32 train-subvp-imagenet32-deep

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# The tests also read the official PyTorch checkpoint fixture, so they need the torch extra.
# TORCH pins the release to install with it: 2.13.0 is the one whose CPU build (190 MB) lies on
# this project's machines; elsewhere pip fetches it from PyPI (add the CPU index for a small one).
TORCH ?= torch==2.13.0
TORCH_STAMP := $(VENV)/.installed-torch

install-torch: $(TORCH_STAMP)

$(TORCH_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[dev,torch]' '$(TORCH)'
	touch $(TORCH_STAMP)

test: install install-torch
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check mlscore_jax tests experiments configs
	$(VENV)/bin/ruff format --check mlscore_jax tests experiments configs

format: install
	$(VENV)/bin/ruff format mlscore_jax tests experiments configs
	$(VENV)/bin/ruff check --fix mlscore_jax tests experiments configs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

# The main job on the embedded default (scikit-learn digits), offline, about 5 min on 2 CPU cores.
demo: install
	$(PY) experiments/demo.py --workdir runs/demo

# Likelihood solver: this project's diffrax ODE NLL vs the official scipy RK45 method.
bench: install
	$(PY) experiments/bench_likelihood.py --workdir runs/bench_likelihood_digits

train: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train $(ARGS)

# The variational dequantizer of a trained score model (second stage, WORKDIR/dequantizer).
train-deq: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train_deq $(ARGS)

eval: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(ARGS)

# Small configurations for a CPU.
train-digits:     ; $(MAKE) train CONFIG=configs/cpu/digits_ddpmpp.py WORKDIR=runs/digits_ddpmpp
train-digits-mlp: ; $(MAKE) train CONFIG=configs/cpu/digits_mlp.py WORKDIR=runs/digits_mlp
train-mnist:      ; $(MAKE) train CONFIG=configs/cpu/mnist_ddpmpp.py WORKDIR=runs/mnist_ddpmpp
train-toy2d:      ; $(MAKE) train CONFIG=configs/cpu/toy2d_mlp.py WORKDIR=runs/toy2d_mlp

# The paper's rows (likelihood weighting + importance sampling), on every local device.
train-vp-cifar10:            ; $(MAKE) train CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp
train-vp-cifar10-deep:       ; $(MAKE) train CONFIG=configs/vp/cifar10_ddpmpp_deep_continuous.py WORKDIR=runs/cifar10_deep_vp
train-subvp-cifar10:         ; $(MAKE) train CONFIG=configs/subvp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_subvp
train-subvp-cifar10-deep:    ; $(MAKE) train CONFIG=configs/subvp/cifar10_ddpmpp_deep_continuous.py WORKDIR=runs/cifar10_deep_subvp
train-vp-imagenet32:         ; $(MAKE) train CONFIG=configs/vp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_vp
train-vp-imagenet32-deep:    ; $(MAKE) train CONFIG=configs/vp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=runs/imagenet32_deep_vp
train-subvp-imagenet32:      ; $(MAKE) train CONFIG=configs/subvp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_subvp
train-subvp-imagenet32-deep: ; $(MAKE) train CONFIG=configs/subvp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=runs/imagenet32_deep_subvp
